"""bench-scale: 1,000 short trials on a simulated 8-node cluster, through slimray's own driver loop.

The driver is the real one (``orchestrator.jobs._run``: Tune with the job's TPE searcher and MO-ASHA, the
Recorder writing every event to the store, the cancel stopper); only the trial and the teacher are replaced
by cheap stand-ins: a trial sleeps 20-60 s in ``max_t`` steps and reports a metric that rises with its steps
and depends on its config, and the size and batch-1 latency its config implies, from its first report.

Measured, once into SQLite and once into PostgreSQL (.ci/postgres.sh):

- wall time of the search against the ideal: the trials' own sleep, list-scheduled in their start order on
  the cluster's slots (so the last wave's tail is not counted as overhead);
- the driver's CPU time (this process: Tune's loop, the searcher, MO-ASHA, the Recorder's writes) over wall;
- the store's write rate, and the Recorder's backlog: a report's delay from the trial to its row, and how
  many reports were in flight (sent, not yet stored) over time and at the end;
- Tune's experiment-state snapshots (count, seconds each), which ``checkpoint_period`` spaces out.

    make bench-scale                                   # ~25 min on 2 cores
    python -m bench.scale --trials 100 --seconds 1 1   # a quick look
"""
from __future__ import annotations

import argparse
import hashlib
import os
import random
import resource
import subprocess
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path
from common.raylink import connect

__all__ = ["no_teacher", "sleepy_trial", "scale_spec", "simulated_cluster", "run", "ideal_makespan"]

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the stand-ins

def no_teacher(low_s: float, high_s: float):
    """A ``prepare`` for ``orchestrator.jobs._run``: no teacher, only what a trial reads from the bundle,
    and how long the trials sleep."""

    def prepare(spec, cache_dir) -> dict:
        return {"teacher_uri": "scale-bench://no-teacher", "dataset": "synthetic", "teacher_key": "scale-bench",
                "teacher_metrics": {"metric": 92.0, "size_bytes": 90_000_000, "latency_ms_b1": 12.0},
                "train": None, "eval": None, "logits": None, "trial_seconds": (low_s, high_s)}

    return prepare


def _shape(cfg) -> tuple[float, float, float]:
    """(metric ceiling, size in bytes, batch-1 ms) a config implies: a MiniLM-like 6x384 teacher cut down."""
    layers = cfg.student.layers or 6
    hidden = cfg.student.hidden or 384
    kind = getattr(cfg.prune, "kind", "none") if cfg.prune is not None else "none"
    sparsity = getattr(cfg.prune, "sparsity", 0.0) if kind != "none" else 0.0
    mode = getattr(cfg.quant, "mode", "none") if cfg.quant is not None else "none"
    bytes_per = {"none": 4.0, "dynamic": 1.0, "static": 1.0, "qat": 1.0, "int4": 0.5, "mixed": 0.75}[mode]
    encoder = layers * 12 * hidden * hidden * (1 - sparsity)
    embeddings = 30522 * hidden
    size = (encoder + embeddings) * bytes_per
    latency = 0.5 + 1.8 * layers * (hidden / 384) ** 2 * (1 - 0.8 * sparsity) * (0.7 if bytes_per < 4 else 1.0)
    ceiling = 92.0 - 6.0 * (1 - layers / 6) ** 2 - 8.0 * sparsity ** 2 - {4.0: 0, 1.0: 0.4}.get(bytes_per, 1.2)
    lr = cfg.train.lr
    ceiling -= 3.0 * abs(__import__("math").log10(lr / 2e-4))  # a learning rate far from 2e-4 costs points
    return ceiling, size, latency


def sleepy_trial(config: dict, shared: dict, settings) -> None:
    """A ``run_trial`` stand-in: sleeps its 20-60 s (drawn per trial) over ``algorithm.max_t`` steps and
    reports step, metric, size and latency at every step; every report also carries when the trial started
    and how long a step sleeps, from which the benchmark times each report's way into the store."""
    import ray
    from ray import tune

    from search.adapters import trial_config

    cfg = trial_config(config, settings.base)
    bundle = ray.get(shared["ref"])
    trial_id = tune.get_context().get_trial_id() or "trial"
    rng = random.Random(int(hashlib.sha256(trial_id.encode()).hexdigest()[:8], 16))
    low, high = bundle["trial_seconds"]
    steps = settings.spec.algorithm.max_t
    step_s = rng.uniform(low, high) / steps
    ceiling, size, latency = _shape(cfg)
    started = time.time()
    for step in range(1, steps + 1):
        time.sleep(max(0.0, started + step * step_s - time.time()))  # sleep-bound, without drift
        metric = ceiling * (1 - 0.45 * 2.0 ** (-step / 2)) + rng.gauss(0, 0.3)
        report = {"step": step, "metric": metric, "metric_drop": 92.0 - metric, "size_bytes": int(size),
                  "latency_ms_b1": latency, "started_wall": started, "step_s": step_s}
        if step == steps:
            report |= {"final": True, "node_id": ray.get_runtime_context().get_node_id()}
        tune.report(report)


def scale_spec(name: str, *, trials: int, concurrent: int, db_url: str, artifact_dir: str, max_t: int = 9):
    """The benchmark's job: the SST-2 example's search space, TPE + MO-ASHA on three objectives."""
    from orchestrator.spec import parse

    return parse({
        "name": name, "teacher": "minilm",
        "search": {"student": {"layers": [2, 3, 4, 6], "hidden": [256, 384]},
                   "prune": {"kind": ["none", "heads", "ffn"], "sparsity": {"low": 0.2, "high": 0.6}},
                   "quant": {"mode": ["none", "dynamic", "int4"]},
                   "train": {"lr": {"low": 5e-5, "high": 1e-3, "log": True}}},
        "algorithm": {"name": "tpe", "asha": "mo", "grace_period": 1, "max_t": max_t, "reduction_factor": 3},
        "objectives": ["metric:max", "size_bytes:min", "latency_ms_b1:min"],
        "budget": {"num_trials": trials, "max_concurrent": concurrent, "max_failures": 0},
        "resources": {"cpus": 1},
        "storage": {"db_url": db_url, "artifact_dir": artifact_dir},
    })


# --------------------------------------------------------------------------- the cluster

class simulated_cluster:
    """``with simulated_cluster(nodes, cpus) as address``: a head with no CPUs and ``nodes`` worker nodes of
    ``cpus`` logical CPUs each, all on 127.0.0.1, joined by this process."""

    def __init__(self, nodes: int, cpus: int):
        self.nodes, self.cpus = nodes, cpus

    def __enter__(self) -> str:
        import ray
        from ray.cluster_utils import Cluster

        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        # the trial processes import the stand-ins above by name
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
        ray.shutdown()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        for _ in range(self.nodes):
            self.cluster.add_node(num_cpus=self.cpus)
        self.cluster.wait_for_nodes()
        connect(self.cluster.address)
        return self.cluster.address

    def __exit__(self, *exc) -> None:
        import ray

        ray.shutdown()
        self.cluster.shutdown()


# --------------------------------------------------------------------------- measuring

def ideal_makespan(durations: list[float], slots: int) -> float:
    """Seconds ``durations`` take when each starts on the first free slot, in the order given."""
    import heapq

    free = [0.0] * slots
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free) if durations else 0.0


class _SnapshotTimer:
    """Times Tune's experiment-state snapshots in this process (bench-only instrumentation)."""

    def __enter__(self):
        from ray.tune.execution.tune_controller import TuneController

        self.seconds: list[float] = []
        self._cls, self._orig = TuneController, TuneController.save_to_dir

        def timed(controller, *a, **k):
            t = time.perf_counter()
            try:
                return self._orig(controller, *a, **k)
            finally:
                self.seconds.append(time.perf_counter() - t)

        TuneController.save_to_dir = timed
        return self

    def __exit__(self, *exc):
        self._cls.save_to_dir = self._orig


def _stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def measure(store, job_id: str, wall_s: float, ended: float, slots: int) -> dict:
    """What the store holds after the search (which ended at ``ended``, epoch seconds), turned into the
    benchmark's numbers."""
    trials = store.trials(job_id)
    sent, stored, work, expected = [], [], [], 0
    for t in trials:
        result = t["result"] or {}
        start, step_s = result.get("started_wall"), result.get("step_s")
        if start is None:
            continue
        work.append((start, int(result.get("step", 0)) * step_s))
        # every step but a finished trial's last is a report the Recorder stores (that one is the result)
        expected += int(result.get("step", 0)) - (t["status"] == "terminated")
        for row in store.metric_history(job_id, t["trial_id"]):
            sent.append(start + row["step"] * step_s)
            stored.append(_stamp(row["at"]))
    lags = sorted(s - r for r, s in zip(sent, stored))
    work.sort()
    writes_span = (max(stored) - min(stored)) if stored else 0.0
    n_writes = len(stored) + 2 * len(trials)  # reports, plus each trial's start and end rows

    def backlog(t: float) -> int:
        return sum(1 for r, s in zip(sent, stored) if r <= t < s)

    t0 = min(sent) if sent else ended
    samples = [(round(t - t0), backlog(t)) for t in (t0 + k * (ended - t0) / 60 for k in range(61))]
    ideal = ideal_makespan([d for _, d in work], slots)
    # the search's own span: the first trial's start to the last one's end (Ray and Tune start-up excluded)
    span = max(((s + d) for s, d in work), default=0.0) - (work[0][0] if work else 0.0)
    return {
        "trials_recorded": len(trials), "trials_unique": len({t["trial_id"] for t in trials}),
        "trials_ended": sum(t["status"] in ("terminated", "stopped_early") for t in trials),
        "trials_full": sum(t["status"] == "terminated" for t in trials),
        "reports": len(sent), "reports_lost": expected - len(sent), "store_writes_per_s": n_writes / writes_span if writes_span else 0.0,
        "report_lag_p50_s": lags[len(lags) // 2] if lags else 0.0,
        "report_lag_p99_s": lags[int(len(lags) * 0.99)] if lags else 0.0,
        "report_lag_max_s": lags[-1] if lags else 0.0,
        "backlog_max": max((b for _, b in samples), default=0), "backlog_over_time": samples,
        "trial_work_s": sum(d for _, d in work), "ideal_s": ideal, "wall_s": wall_s, "search_wall_s": span,
        "wall_over_ideal": span / ideal if ideal else 0.0,
    }


def run(db_url: str, *, trials: int, nodes: int, cpus_per_node: int, seconds: tuple[float, float],
        label: str, log=print) -> dict:
    """One benchmark run on a fresh simulated cluster; returns its row."""
    from db import Store
    from orchestrator.jobs import _run
    from orchestrator.recorder import Recorder

    slots = nodes * cpus_per_node
    work = Path(tempfile.mkdtemp(prefix="slimray-scale-"))
    spec = scale_spec(f"scale-{label}", trials=trials, concurrent=slots, db_url=db_url,
                      artifact_dir=str(work / "jobs"))
    store = Store(db_url)
    job_id = f"scale-{label}-{time.strftime('%H%M%S')}"
    store.create_job(job_id, spec.name, spec.stored(), teacher=spec.teacher, dataset=spec.task.dataset)
    pending: list[tuple[float, int]] = []  # the Recorder's backlog: queued for its writer thread, or being written
    recorders: list = []
    done = threading.Event()

    def watch():  # samples the Recorder's queue, and logs progress
        import gc

        while not done.wait(5.0):
            recorders[:] = recorders or [o for o in gc.get_objects() if isinstance(o, Recorder)]
            pending.append((time.time(), sum(r.pending for r in recorders)))
            counts = store.get_job(job_id)["trial_counts"]
            log(f"  [{label}] {time.strftime('%H:%M:%S')} trials {counts}")

    with simulated_cluster(nodes, cpus_per_node):
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        with _SnapshotTimer() as snaps:
            _run(job_id, spec, store, trainable=sleepy_trial, prepare=no_teacher(*seconds))
        wall, ended = time.monotonic() - wall0, time.time()
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        done.set()
        watcher.join()
    pending_end = sum(r.pending for r in recorders)
    driver_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    row = {"store": label, "trials": trials, "nodes": nodes, "slots": slots,
           "trial_s": f"{seconds[0]:g}-{seconds[1]:g}", **measure(store, job_id, wall, ended, slots),
           "driver_cpu_s": driver_cpu, "driver_cpu_share": driver_cpu / wall,
           "recorder_pending_max": max((p for _, p in pending), default=0),
           "recorder_pending_end": pending_end, "recorder_found": bool(recorders),
           "snapshots": len(snaps.seconds), "snapshot_s_mean": (sum(snaps.seconds) / len(snaps.seconds)
                                                                  if snaps.seconds else 0.0),
           "snapshot_period_s": float(os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "0")),
           "job_status": store.get_job(job_id)["status"]}
    row["driver_overhead"] = row["wall_over_ideal"] - 1
    store.close()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--cpus-per-node", type=int, default=8, help="logical CPUs (trial slots) per node")
    parser.add_argument("--seconds", type=float, nargs=2, default=(20.0, 60.0), metavar=("LOW", "HIGH"))
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"])
    parser.add_argument("--out", default="scale", help="results file name under bench/results")
    args = parser.parse_args()
    from bench.common import print_table, print_targets, target, write

    rows = []
    for kind in args.stores:
        if kind == "sqlite":
            url = f"sqlite:///{tempfile.mkdtemp(prefix='slimray-scale-db-')}/slimray.db"
        else:
            url = subprocess.run(["bash", str(ROOT / ".ci/postgres.sh")], capture_output=True,
                                 text=True).stdout.strip()
            if not url:
                print("no PostgreSQL server (see .ci/postgres.sh): skipped")
                continue
        print(f"{kind}: {args.trials} trials of {args.seconds[0]:g}-{args.seconds[1]:g} s on {args.nodes} "
              f"simulated nodes x {args.cpus_per_node} slots", flush=True)
        rows.append(run(url, trials=args.trials, nodes=args.nodes, cpus_per_node=args.cpus_per_node,
                        seconds=tuple(args.seconds), label=kind, log=lambda m: print(m, flush=True)))
    print_table(rows, ["store", "trials", "slots", "trials_recorded", "trials_ended", "wall_s", "search_wall_s",
                       "ideal_s",
                       "driver_overhead", "driver_cpu_share", "store_writes_per_s", "report_lag_p99_s",
                       "backlog_max", "recorder_pending_end", "snapshots", "snapshot_s_mean"])
    targets = []
    for r in rows:
        targets += [
            target(f"{r['store']}: trials run and recorded once", f"{r['trials']}",
                   f"{r['trials_unique']} of {r['trials_recorded']} rows, {r['trials_ended']} ended",
                   r["trials_unique"] == r["trials_recorded"] == r["trials_ended"] == r["trials"]),
            target(f"{r['store']}: driver overhead (search wall over ideal - 1)", "≤ 5%",
                   f"{100 * r['driver_overhead']:.1f}%", r["driver_overhead"] <= 0.05),
            target(f"{r['store']}: recorder backlog at the end", "0 reports in flight, queued or lost",
                   f"{r['backlog_over_time'][-1][1]} in flight, {r['recorder_pending_end']} queued, "
                   f"{r['reports_lost']} lost",
                   r["backlog_over_time"][-1][1] == r["recorder_pending_end"] == r["reports_lost"] == 0),
        ]
    if args.trials < 1000 or args.nodes < 8:
        targets.append(target("scale", "1,000 trials on 8 nodes", f"{args.trials} trials on {args.nodes} nodes",
                              False))
    print_targets(targets)
    print(f"wrote {write(args.out, rows, targets)}")


if __name__ == "__main__":
    main()
