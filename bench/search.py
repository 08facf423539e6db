"""bench-search: (P2) search efficiency and (b) orchestration overhead.

(P2) TPE + multi-objective ASHA, random search and TPE + accuracy-only ASHA, same trial budget, one search per
    strategy and seed, real trials (1–3-layer students of the benchmarks' fine-tuned MiniLM teacher on an SST-2
    subset, logits-only distillation from cached teacher logits): the front's hypervolume against the training
    steps spent. Target: TPE + MO-ASHA reaches random search's final hypervolume with ≤ 50% of random's steps
    (median over seeds; each search is compared with the random search of its own seed).
(warm) Warm start from the store: job A (TPE + MO-ASHA, seed 0) runs its trials; then job B (seed 1) runs the
    same number of trials twice, side by side: seeded with A's finished trials (``search.warm_start: [A]``) and
    cold. Each B's front is built from its own trials only, and counted in its own trials. Target: the warm B
    reaches A's final hypervolume within ≤ 50% of its trials.
(b) With a trainable that sleeps, the share of a search's wall time spent outside trials (target ≤ 5%), and
    trial throughput on a simulated 4-node cluster vs 1 node (target ≥ 3.5×), through slimray's own driver
    pieces (searcher factory, store recorder, cancel stopper).

    make bench-search                 # P2 ~19 min (9 searches of 10 trials) + (b) ~2 min on 2 cores
    python -m bench.search --part p2 --seeds 1 --trials 3
    python -m bench.search --part overhead
    python -m bench.search --part warm        # ~8 min: 3 searches of 10 trials
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

from bench.common import CACHE, print_table, print_targets, setup_env, target, teacher, write, write_part
from common.raylink import connect

# P2: every search draws from this space on the same teacher and task; only the strategy and the seed change.
SPACE = {
    "student": {"layers": [1, 2, 3]},
    "prune": {"kind": ["none", "heads", "ffn", "structured"], "sparsity": {"low": 0.2, "high": 0.7},
              "importance": "magnitude"},
    "quant": {"mode": ["none", "dynamic", "int4"]},
    "distill": {"temperature": {"low": 1.0, "high": 6.0}},
    "train": {"lr": {"low": 3e-5, "high": 1e-3, "log": True}},
}
OBJECTIVES = [("metric", "max"), ("size_bytes", "min"), ("latency_ms_b1", "min")]
STRATEGIES = {"random": {"name": "random", "asha": "none"},
              "tpe+mo-asha": {"name": "tpe", "asha": "mo"},
              "tpe+metric-asha": {"name": "tpe", "asha": "metric"}}


def _p2_job(label: str, seed: int, teacher_uri: str, root: Path, trials: int, steps: int, every: int) -> dict:
    algorithm = {**STRATEGIES[label], "seed": seed, "time_attr": "step", "grace_period": every, "max_t": steps,
                 "reduction_factor": 2}
    return {
        "name": f"p2-{label.replace('+', '-')}-s{seed}", "teacher": teacher_uri,
        # 2,000 rows: a trial reads at most steps × 32 of them; 300 dev rows keep each rung's evaluation short
        "task": {"dataset": "glue/sst2", "train_size": 2000, "eval_size": 300, "max_length": 64},
        "search": SPACE, "algorithm": algorithm, "objectives": [f"{n}:{m}" for n, m in OBJECTIVES],
        "budget": {"num_trials": trials, "max_concurrent": 1}, "resources": {"cpus": 2},
        "train": {"epochs": 1, "max_steps": steps, "batch_size": 32, "eval_every": every},
        "latency": {"runs": 10, "seq_len": 64},
        "storage": {"db_url": f"sqlite:///{root}/p2.db", "artifact_dir": str(root / "jobs")},
    }


def _steps(store, job_id: str, trial: dict) -> float:
    """Training steps a trial ran: its last report's step (a stopped trial's rung), else its history's."""
    result = trial.get("result") or {}
    got = result.get("step") or result.get("train_steps")
    if got is None:
        got = max((h.get("step") or 0 for h in store.metric_history(job_id, trial["trial_id"])), default=0)
    return float(got)


def _curve(store, job_id: str, baseline: dict) -> list[tuple[float, float]]:
    """(training steps spent so far, hypervolume of the finished trials' front), one point per trial in
    completion order. Only trials that ran to the end count towards the front: a stopped one left no model."""
    from orchestrator.report import normalised, reference
    from search.pareto import front, hypervolume

    directions = [m for _, m in OBJECTIVES]
    ref = reference(OBJECTIVES, baseline)
    done, spent, out = [], 0.0, []
    for t in sorted(store.trials(job_id), key=lambda t: t["finished_at"] or ""):
        spent += _steps(store, job_id, t)
        if t["status"] == "terminated" and all(t.get(n) is not None for n, _ in OBJECTIVES):
            done.append(normalised(t, OBJECTIVES, baseline))
        pts = [done[i] for i in front(done, directions)] if done else []
        out.append((spent, hypervolume(pts, directions, ref) if pts else 0.0))
    return out


def _reach(curve: list[tuple[float, float]], goal: float) -> float | None:
    """Training steps after which ``curve`` first reaches hypervolume ``goal`` (None: never)."""
    if goal <= 0:
        return None
    return next((s for s, hv in curve if hv >= goal * (1 - 1e-9)), None)


def _median(values: list[float]) -> float:
    s = sorted(values)
    return (s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2 if s else float("nan")


def _p2_summary(runs: list[dict]) -> tuple[list[dict], list[dict]]:
    """Rows per (strategy, seed) and per strategy, and the target. Each run is compared with the random search
    of its own seed: same trial budget, and the steps random needed for its final hypervolume as the unit."""
    random = {r["seed"]: r for r in runs if r["strategy"] == "random"}
    rows = []
    for r in runs:
        base = random.get(r["seed"])
        reach = _reach(r["curve"], base["final_hypervolume"]) if base else None
        share = reach / base["train_steps"] if reach is not None and base and base["train_steps"] else None
        rows.append({k: r[k] for k in ("strategy", "seed", "trials", "stopped_early", "failed", "train_steps",
                                       "final_hypervolume", "wall_s")}
                    | {"steps_to_random_hv": reach, "share_of_random_steps": share})
    summary = []
    for label in STRATEGIES:
        mine = [row for row in rows if row["strategy"] == label]
        if not mine:
            continue
        shares = [row["share_of_random_steps"] if row["share_of_random_steps"] is not None else math.inf
                  for row in mine]
        summary.append({"strategy": label, "seed": "median", "trials": _median([x["trials"] for x in mine]),
                        "stopped_early": _median([x["stopped_early"] for x in mine]),
                        "failed": sum(x["failed"] for x in mine),
                        "train_steps": _median([x["train_steps"] for x in mine]),
                        "final_hypervolume": _median([x["final_hypervolume"] for x in mine]),
                        "wall_s": _median([x["wall_s"] for x in mine]),
                        "reached": f"{sum(math.isfinite(s) for s in shares)}/{len(shares)}",
                        "share_of_random_steps": _median(shares) if math.isfinite(_median(shares)) else None})
    mo = next((s for s in summary if s["strategy"] == "tpe+mo-asha"), None)
    targets = []
    if mo is not None:
        share = mo["share_of_random_steps"]
        value = round(share, 3) if share is not None else "never reached (median seed)"
        targets.append(target("P2: TPE+MO-ASHA training steps to reach random search's final hypervolume "
                               f"(median over {len(random)} seeds)", "≤ 0.5× random's", value,
                              share is not None and share <= 0.5))
    return rows + summary, targets


def p2(seeds: list[int], trials: int, steps: int, every: int, on_run=None) -> tuple[list[dict], list[dict], dict]:
    """TPE + MO-ASHA, random search and TPE + accuracy-only ASHA, once per seed each, on the same task, with
    hypervolume tracked against training steps. All hypervolumes share one reference point: the first job's
    teacher baseline (every job measures the same cached teacher). ``on_run(rows, targets, extra)`` is called
    after each search so that a long run leaves results behind as it goes."""
    import shutil

    from db import Store
    from orchestrator.jobs import submit
    from orchestrator.report import describe_config, reference
    from orchestrator.spec import parse

    _, t = teacher()
    # one root for every run: the job teacher (its dev metrics, latency and logits) is prepared once and reused
    root = CACHE / "search-p2"
    root.mkdir(parents=True, exist_ok=True)
    runs, baseline = [], None
    for seed in seeds:
        for label in STRATEGIES:
            t0 = time.perf_counter()
            job_id = submit(parse(_p2_job(label, seed, t.uri, root, trials, steps, every)))
            wall = time.perf_counter() - t0
            store = Store(f"sqlite:///{root}/p2.db")
            baseline = baseline or store.get_job(job_id)["baseline"]
            curve = _curve(store, job_id, baseline)
            trials_ = store.trials(job_id)
            runs.append({"strategy": label, "seed": seed, "job_id": job_id, "trials": len(trials_),
                         "stopped_early": sum(x["status"] == "stopped_early" for x in trials_),
                         "failed": sum(x["status"] == "error" for x in trials_),
                         "train_steps": curve[-1][0] if curve else 0.0,
                         "final_hypervolume": curve[-1][1] if curve else 0.0, "wall_s": wall, "curve": curve,
                         "trials_detail": [{"config": describe_config(x["config"]), "status": x["status"],
                                            "steps": _steps(store, job_id, x),
                                            **{n: x.get(n) for n, _ in OBJECTIVES}} for x in trials_]})
            shutil.rmtree(root / "jobs" / job_id, ignore_errors=True)  # trial artifacts: tens of MB each
            rows, targets = _p2_summary(runs)
            extra = {"settings": {"seeds": seeds, "trials": trials, "max_steps": steps, "eval_every": every,
                                  "grace_period": every, "reduction_factor": 2, "batch_size": 32,
                                  "reference": reference(OBJECTIVES, baseline), "baseline": baseline,
                                  "compared_with": "the random search of the same seed"},
                     "runs": [{k: v for k, v in r.items()} for r in runs]}
            if on_run:
                on_run(rows, targets, extra)
    return rows, targets, extra


def warm(trials: int, steps: int, every: int) -> tuple[list[dict], list[dict], dict]:
    """Job A, then job B warm-started from A and job B cold, the same seed and budget for both Bs."""
    import shutil

    from db import Store
    from orchestrator.jobs import submit
    from orchestrator.report import reference
    from orchestrator.spec import parse

    _, t = teacher()
    root = CACHE / "search-warm"
    shutil.rmtree(root, ignore_errors=True)  # "auto" would also find earlier runs' jobs; this run names its source
    root.mkdir(parents=True)
    store = Store(f"sqlite:///{root}/p2.db")
    runs, baseline, first = [], None, None
    for label, seed, sources in (("A", 0, None), ("B warm", 1, "A"), ("B cold", 1, None)):
        job = _p2_job("tpe+mo-asha", seed, t.uri, root, trials, steps, every)
        job["name"] = f"warm-{label.replace(' ', '-').lower()}"
        if sources:
            job["search"] = {**job["search"], "warm_start": [first]}
        t0 = time.perf_counter()
        job_id = submit(parse(job))
        wall = time.perf_counter() - t0
        first = first or job_id
        baseline = baseline or store.get_job(job_id)["baseline"]
        curve = _curve(store, job_id, baseline)
        runs.append({"job": label, "job_id": job_id, "seed": seed, "trials": len(curve),
                     "warm_sources": store.get_job(job_id).get("warm_sources"), "wall_s": wall,
                     "final_hypervolume": curve[-1][1] if curve else 0.0, "curve_by_trial": [hv for _, hv in curve]})
        shutil.rmtree(root / "jobs" / job_id, ignore_errors=True)
    goal = runs[0]["final_hypervolume"]
    rows = []
    for r in runs:
        reach = next((i + 1 for i, hv in enumerate(r["curve_by_trial"]) if goal > 0 and hv >= goal * (1 - 1e-9)),
                     None)
        rows.append({**{k: r[k] for k in ("job", "seed", "trials", "final_hypervolume", "wall_s")},
                     "trials_to_a_hv": reach if r["job"] != "A" else None,
                     "share_of_trials": reach / r["trials"] if reach and r["job"] != "A" else None})
    warm_row = rows[1]
    value = warm_row["share_of_trials"] if warm_row["share_of_trials"] is not None else "never reached"
    targets = [target("warm start: job B's own trials to reach job A's final hypervolume", "≤ 50% of its trials",
                      value, warm_row["share_of_trials"] is not None and warm_row["share_of_trials"] <= 0.5)]
    extra = {"settings": {"trials": trials, "max_steps": steps, "eval_every": every, "strategy": "tpe+mo-asha",
                          "reference": reference(OBJECTIVES, baseline), "baseline": baseline},
             "runs": runs}
    return rows, targets, extra


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
        connect(cluster.address)
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
    ap.add_argument("--part", choices=("all", "p2", "warm", "overhead"), default="all")
    ap.add_argument("--seeds", type=int, default=3, help="P2: searches per strategy (seeds 0..n-1)")
    ap.add_argument("--trials", type=int, default=10, help="P2: trials per search")
    ap.add_argument("--steps", type=int, default=32, help="P2: training steps of a trial run to the end (batch 32)")
    ap.add_argument("--eval-every", type=int, default=8, help="P2: steps between reports; also ASHA's first rung")
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
    if args.part in ("all", "p2"):
        columns = ["strategy", "seed", "trials", "stopped_early", "failed", "train_steps", "final_hypervolume",
                   "steps_to_random_hv", "share_of_random_steps", "reached", "wall_s"]

        def save(rows, targets, extra):
            return write_part("search", "p2", rows, targets, extra)

        rows, targets, extra = p2(list(range(args.seeds)), args.trials, args.steps, args.eval_every, on_run=save)
        print_table(rows, columns)
        print_targets(targets)
        print(f"wrote {save(rows, targets, extra)}")
    if args.part in ("all", "warm"):
        rows, targets, extra = warm(args.trials, args.steps, args.eval_every)
        print_table(rows, ["job", "seed", "trials", "final_hypervolume", "trials_to_a_hv", "share_of_trials",
                           "wall_s"])
        print_targets(targets)
        print(f"wrote {write_part('search', 'warm', rows, targets, extra)}")

if __name__ == "__main__":
    main()
