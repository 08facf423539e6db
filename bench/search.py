"""bench-search: (a) search efficiency and (b) orchestration overhead.

(a) Multi-objective TPE + ASHA vs random search, same trial budget, real trials (1–3-layer students of the
    benchmarks' fine-tuned MiniLM teacher on an SST-2 subset): hypervolume as a function of the compute spent
    (training steps). Target: TPE+ASHA reaches random's final hypervolume with ≤ 50% of random's compute.
(b) With a trainable that sleeps, the share of a search's wall time spent outside trials (target ≤ 5%), and
    trial throughput on a simulated 4-node cluster vs 1 node (target ≥ 3.5×), through slimray's own driver
    pieces (searcher factory, store recorder, cancel stopper).

    make bench-search                 # (a) ~25 min + (b) ~2 min on 2 cores
    python -m bench.search --part overhead
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bench.common import print_table, print_targets, setup_env, target, teacher, write

SPACE = {
    "student": {"layers": [1, 2, 3]},
    "prune": {"kind": ["none", "heads", "ffn", "structured"], "sparsity": {"low": 0.2, "high": 0.7},
              "importance": "magnitude"},
    "quant": {"mode": ["none", "dynamic", "int4"]},
    "distill": {"temperature": {"low": 1.0, "high": 6.0}},
    "train": {"lr": {"low": 3e-5, "high": 1e-3, "log": True}},
}


def _job(name: str, algorithm: dict, teacher_uri: str, root: Path, trials: int, steps: int) -> dict:
    return {
        "name": name, "teacher": teacher_uri,
        "task": {"dataset": "glue/sst2", "train_size": 8000, "eval_size": 400, "max_length": 64},
        "search": SPACE, "algorithm": algorithm,
        "objectives": ["metric:max", "size_bytes:min", "latency_ms_b1:min"],
        "budget": {"num_trials": trials, "max_concurrent": 1},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": 32, "eval_every": max(1, steps // 4)},
        "latency": {"runs": 10, "seq_len": 64},
        "storage": {"db_url": f"sqlite:///{root}/search.db", "artifact_dir": str(root / "jobs")},
    }


def _curve(trials: list[dict], baseline: dict) -> list[tuple[float, float]]:
    """(cumulative training steps, hypervolume of everything finished so far), in completion order."""
    from orchestrator.report import normalised, reference
    from search.pareto import front, hypervolume

    objs = [("metric", "max"), ("size_bytes", "min"), ("latency_ms_b1", "min")]
    ref = reference(objs, baseline)
    done, spent, out = [], 0.0, []
    for t in sorted(trials, key=lambda t: t["finished_at"] or ""):
        hist = t.get("result") or {}
        spent += float(hist.get("step") or hist.get("train_steps") or 0)
        if t["status"] == "terminated" and t.get("size_bytes"):
            done.append(normalised(t, objs, baseline))
        pts = [done[i] for i in front(done, [m for _, m in objs])] if done else []
        out.append((spent, hypervolume(pts, [m for _, m in objs], ref) if pts else 0.0))
    return out


def efficiency(trials: int, steps: int) -> tuple[list[dict], list[dict], dict]:
    from db import Store
    from orchestrator.jobs import submit
    from orchestrator.spec import parse

    _, t = teacher()
    root = Path(tempfile.mkdtemp(prefix="slimray-bench-search-"))
    curves, rows = {}, []
    for label, algo in (("random", {"name": "random", "asha": "none", "seed": 0}),
                        ("tpe+asha", {"name": "tpe", "asha": "metric", "grace_period": max(1, steps // 4),
                                      "max_t": steps, "reduction_factor": 2, "seed": 0})):
        t0 = time.perf_counter()
        job_id = submit(parse(_job(f"bench-{label.replace('+', '-')}", algo, t.uri, root, trials, steps)))
        wall = time.perf_counter() - t0
        store = Store(f"sqlite:///{root}/search.db")
        job = store.get_job(job_id)
        tr = store.trials(job_id)
        curves[label] = _curve(tr, job["baseline"])
        rows.append({"search": label, "trials": len(tr),
                     "stopped_early": sum(x["status"] == "stopped_early" for x in tr),
                     "failed": sum(x["status"] == "error" for x in tr),
                     "train_steps": curves[label][-1][0] if curves[label] else 0,
                     "final_hypervolume": curves[label][-1][1] if curves[label] else 0.0, "wall_s": wall})
    goal = curves["random"][-1][1] if curves["random"] else 0.0
    spent_random = curves["random"][-1][0] if curves["random"] else 0.0
    reach = next((s for s, hv in curves["tpe+asha"] if hv >= goal and goal > 0), None)
    share = (reach / spent_random) if reach is not None and spent_random else float("inf")
    targets = [target("TPE+ASHA compute to reach random's final hypervolume", "≤ 0.5× random's",
                      round(share, 3) if share != float("inf") else "never reached", share <= 0.5)]
    return rows, targets, {"curves": {k: [list(p) for p in v] for k, v in curves.items()}}


def _sleepy(config, seconds: float):
    """Stands in for a trial: the point's temperature drives made-up objectives; the time is all sleep."""
    from ray import tune

    x = config["distill.temperature"]
    for step in range(1, 3):
        time.sleep(seconds / 2)
        tune.report({"step": step, "metric": 50 + x, "size_bytes": 1e6 / x, "latency_ms_b1": x, "final": step == 2})


def _sleep_search(n_trials: int, seconds: float, concurrent: int, root: Path, store_url: str) -> dict:
    from ray import tune

    from db import Store
    from orchestrator.recorder import Recorder
    from orchestrator.stopper import CancelStopper
    from search.algorithms import SearchSettings, make
    from search.space import SearchSpace

    job_id = f"overhead-{concurrent}-{time.time_ns()}"
    store = Store(store_url)
    store.create_job(job_id, "overhead", {}, teacher="-", dataset="-")
    space = SearchSpace()
    settings = SearchSettings(name="random", asha="none")
    search_alg, scheduler = make(space, settings, (), max_concurrent=concurrent)
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_sleepy, seconds=seconds), {"cpu": 1}),
        param_space={"distill.temperature": tune.uniform(1, 6)},
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=n_trials,
                                    reuse_actors=True),  # as slimray's driver does for in-process trials
        run_config=tune.RunConfig(name=job_id, storage_path=str(root), verbose=0,
                                  callbacks=[Recorder(store_url, job_id)], stop=CancelStopper(store_url, job_id)))
    t0 = time.perf_counter()
    tuner.fit()
    wall = time.perf_counter() - t0
    recorded = len(store.trials(job_id))
    ideal = n_trials * seconds / concurrent
    return {"nodes": concurrent, "trials": n_trials, "recorded": recorded, "trial_s": seconds, "wall_s": wall,
            "ideal_s": ideal, "overhead_share": max(0.0, (wall - ideal) / wall), "trials_per_min": 60 * n_trials / wall}


def overhead(n_trials: int, seconds: float) -> tuple[list[dict], list[dict]]:
    import ray
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    root = Path(tempfile.mkdtemp(prefix="slimray-bench-overhead-"))
    url = f"sqlite:///{root}/overhead.db"
    rows = []
    for nodes in (1, 4):
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})  # the driver's node runs no trials
        for _ in range(nodes):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, log_to_driver=False)
        try:
            rows.append(_sleep_search(n_trials, seconds, nodes, root, url))
        finally:
            ray.shutdown()
            cluster.shutdown()
    one, four = rows
    speedup = four["trials_per_min"] / one["trials_per_min"]
    targets = [target("orchestration overhead share of wall time (1 node, serial trials)", "≤ 5%",
                      round(100 * one["overhead_share"], 2), one["overhead_share"] <= 0.05),
               target("trial throughput, 4 nodes vs 1", "≥ 3.5×", round(speedup, 2), speedup >= 3.5)]
    return rows, targets


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", choices=("all", "efficiency", "overhead"), default="all")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48, help="max training steps per trial (batch 32)")
    ap.add_argument("--sleep-trials", type=int, default=8)
    ap.add_argument("--sleep-s", type=float, default=15.0, help="a short real trial here takes 15–60 s")
    args = ap.parse_args(argv)
    setup_env()
    if args.part in ("all", "overhead"):
        rows, targets = overhead(args.sleep_trials, args.sleep_s)
        print_table(rows, ["nodes", "trials", "recorded", "trial_s", "wall_s", "ideal_s", "overhead_share",
                           "trials_per_min"])
        print_targets(targets)
        print(f"wrote {write('overhead', rows, targets)}")
    if args.part in ("all", "efficiency"):
        rows, targets, extra = efficiency(args.trials, args.steps)
        print_table(rows, ["search", "trials", "stopped_early", "failed", "train_steps", "final_hypervolume",
                           "wall_s"])
        print_targets(targets)
        print(f"wrote {write('search', rows, targets, extra)}")


if __name__ == "__main__":
    main()
