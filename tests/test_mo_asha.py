"""MO-ASHA: the pure ranking (search.pareto), the scheduler's rung decisions on hand-made results, and a tiny
real Tune run."""
from __future__ import annotations

import itertools
import math
import random
from types import SimpleNamespace

import pytest

from common.errors import ConfigError
from search.pareto import crowding_distance, dominated_by, front, front_index, ranks
from common.raylink import connect

CONTINUE, STOP = "CONTINUE", "STOP"
MIN2 = ["min", "min"]
THREE = (("metric", "max"), ("size_bytes", "min"), ("latency_ms_b1", "min"))


def _scheduler(**kw):
    from search.mo_asha import MOASHAScheduler

    return MOASHAScheduler(**{"time_attr": "step", "objectives": THREE, "max_t": 16, "grace_period": 1,
                              "reduction_factor": 2, **kw})


def _report(sched, trial_id, step, metric, size, latency):
    return sched.on_trial_result(None, SimpleNamespace(trial_id=trial_id),
                                 {"step": step, "metric": metric, "size_bytes": size, "latency_ms_b1": latency})


def _random_rows(rng, n, m=3, levels=4):
    # few distinct levels per objective: many ties, partial and full, which is where orderings leak in
    return [[rng.randrange(levels) for _ in range(m)] for _ in range(n)]


# --------------------------------------------------------------------------- pure ranking

def test_front_index_and_crowding_on_a_hand_made_set():
    rows = [[1, 9], [3, 5], [6, 2], [9, 1], [4, 6], [7, 7]]
    assert front_index(rows, MIN2) == [0, 0, 0, 0, 1, 2]
    d = crowding_distance(rows[:4], MIN2)
    assert d[0] == d[3] == math.inf
    assert d[1] == pytest.approx((6 - 1) / 8 + (9 - 2) / 8) and d[2] == pytest.approx((9 - 3) / 8 + (5 - 1) / 8)
    # [3, 5] has the wider gaps around it (1.5 vs 1.25), so it ranks ahead of [6, 2]; the ends share rank 0
    assert ranks(rows, MIN2) == [0, 2, 3, 0, 4, 5]


def test_max_objectives_rank_like_negated_min_ones():
    rng = random.Random(3)
    for _ in range(50):
        rows = _random_rows(rng, 9)
        flipped = [[-r[0], r[1], r[2]] for r in rows]
        assert ranks(rows, ["max", "min", "min"]) == ranks(flipped, ["min", "min", "min"])


def _brute_force_ranks(rows, directions):
    """The definition, written out: how many rows are strictly ahead on (front, -crowding)."""
    fronts = front_index(rows, directions)
    crowd = [0.0] * len(rows)
    for k in set(fronts):
        members = [i for i in range(len(rows)) if fronts[i] == k]
        for i, d in zip(members, crowding_distance([rows[i] for i in members], directions)):
            crowd[i] = d
    return [sum((fronts[j], -crowd[j]) < (fronts[i], -crowd[i]) for j in range(len(rows)))
            for i in range(len(rows))]


def test_ranks_are_each_rows_own_rank_not_the_sort_order():
    rng = random.Random(0)
    confused = 0
    for _ in range(200):
        rows = _random_rows(rng, rng.randrange(1, 12))
        got = ranks(rows, ["max", "min", "min"])
        assert got == _brute_force_ranks(rows, ["max", "min", "min"])
        # the published mistake: reading argsort's output (which row sits at position i) as row i's rank
        order = sorted(range(len(rows)), key=lambda i: got[i])
        confused += order != got
    assert confused > 100  # the two differ on most sets, so the check above would catch the mix-up


def test_ranking_is_permutation_invariant_over_every_order():
    rng = random.Random(1)
    for _ in range(10):
        rows = _random_rows(rng, 6)
        expected = ranks(rows, ["max", "min", "min"])
        for perm in itertools.permutations(range(6)):
            got = ranks([rows[i] for i in perm], ["max", "min", "min"])
            assert [got[perm.index(i)] for i in range(6)] == expected


def test_ranking_is_permutation_invariant_on_larger_sets():
    rng = random.Random(2)
    for _ in range(20):
        rows = _random_rows(rng, 40, levels=6)
        expected = ranks(rows, ["max", "min", "min"])
        for _ in range(30):
            perm = list(range(40))
            rng.shuffle(perm)
            got = ranks([rows[i] for i in perm], ["max", "min", "min"])
            assert [got[perm.index(i)] for i in range(40)] == expected


def test_crowding_refuses_infinite_values():
    with pytest.raises(ConfigError, match="finite"):
        crowding_distance([[1, math.inf], [2, 3]], MIN2)


# --------------------------------------------------------------------------- scheduler decisions

def test_rungs_follow_grace_period_times_reduction_factor_powers():
    assert list(_scheduler(max_t=100, grace_period=1, reduction_factor=4).rungs) == [1, 4, 16, 64]
    assert list(_scheduler(max_t=20, grace_period=2, reduction_factor=3).rungs) == [2, 6, 18]


def test_the_first_eta_at_a_rung_always_continue_even_when_dominated():
    sched = _scheduler(reduction_factor=3)
    assert _report(sched, "best", 1, 90, 10, 1) == CONTINUE
    assert _report(sched, "worse", 1, 50, 20, 2) == CONTINUE
    assert _report(sched, "worst", 1, 40, 30, 3) == CONTINUE
    assert _report(sched, "worst-again", 1, 30, 40, 4) == STOP  # the fourth has three to be ranked against


def test_a_dominated_trial_in_the_bottom_share_stops():
    sched = _scheduler(reduction_factor=2)
    for i in range(5):  # five trials along a front: metric up, size and latency up
        assert _report(sched, f"t{i}", 1, 80 + i, 10 + i, 1 + i) == CONTINUE
    # dominated by t0..t4 (lower metric than every one, larger and slower): rank 5 of 6, outside ceil(6/2)
    assert _report(sched, "bad", 1, 70, 100, 50) == STOP
    assert sched.num_stopped == 1


def test_a_dominated_trial_in_the_top_share_continues():
    sched = _scheduler(reduction_factor=2)
    for i, row in enumerate([(90, 10, 1), (50, 50, 50), (40, 60, 60), (30, 70, 70)]):
        _report(sched, f"t{i}", 1, *row)
    # dominated by t0 only: second front, and the rung's fronts 0 and 1 hold the top ceil(5/2) = 3 places
    assert _report(sched, "second", 1, 80, 20, 2) == CONTINUE


def test_a_newly_arriving_pareto_optimal_trial_always_continues():
    rng = random.Random(5)
    arrivals_on_front = 0
    for run in range(40):
        sched = _scheduler(reduction_factor=rng.choice([2, 3, 4]))
        seen = []
        for i in range(30):
            row = [rng.randrange(60, 100), rng.randrange(1, 50), rng.randrange(1, 50)]
            seen.append(row)
            action = _report(sched, f"r{run}-{i}", 1, *row)
            if i in front(seen, ["max", "min", "min"]):
                arrivals_on_front += 1
                assert action == CONTINUE, (run, i, row)
    assert arrivals_on_front > 100


def test_a_front_member_with_the_lowest_crowding_still_continues():
    # a crowded front: the arriving trial sits between two close neighbours, so by crowding it ranks last of
    # the front and outside ceil(n/η); being non-dominated it must continue all the same
    sched = _scheduler(objectives=(("metric", "max"), ("size_bytes", "min")), reduction_factor=4)
    for i, (m, s) in enumerate([(60, 1), (70, 10), (80, 20), (90, 30), (99, 40), (69, 10.5)]):
        sched.on_trial_result(None, SimpleNamespace(trial_id=f"t{i}"), {"step": 1, "metric": m, "size_bytes": s})
    action = sched.on_trial_result(None, SimpleNamespace(trial_id="mid"), {"step": 1, "metric": 71,
                                                                         "size_bytes": 10.2})
    recorded = list(sched.rungs[1].values())
    assert front_index(recorded, ["max", "min"])[-1] == 0
    assert ranks(recorded, ["max", "min"])[-1] >= math.ceil(len(recorded) / 4)
    assert action == CONTINUE


def test_decisions_follow_the_documented_rule_exactly():
    """continue iff among the first η, or on the rung's front, or ranked inside ceil(n/η): the scheduler's
    shortcuts (counting dominators) must never change a decision."""
    rng = random.Random(9)
    directions = ["max", "min", "min"]
    for run in range(10):
        eta = rng.choice([2, 3, 4])
        sched = _scheduler(reduction_factor=eta)
        seen = []
        for i in range(60):
            row = [rng.randrange(50, 100), rng.randrange(1, 30), rng.randrange(1, 30)]
            seen.append(row)
            n = len(seen)
            expected = n <= eta or front_index(seen, directions)[-1] == 0 or \
                ranks(seen, directions)[-1] < math.ceil(n / eta)
            assert (_report(sched, f"{run}-{i}", 1, *row) == CONTINUE) == expected, (run, i)


def test_dominated_by_counts_the_rows_that_dominate():
    rows = [[1, 9], [3, 5], [6, 2], [4, 6], [7, 7], [4, 6]]
    assert [dominated_by(rows, MIN2, i) for i in range(len(rows))] == [0, 0, 0, 1, 4, 1]


def test_a_result_missing_an_objective_is_not_ranked():
    sched = _scheduler(reduction_factor=2)
    for i in range(4):
        _report(sched, f"t{i}", 1, 90, 10, 1)
    trial = SimpleNamespace(trial_id="early")
    assert sched.on_trial_result(None, trial, {"step": 1, "metric": 10}) == CONTINUE
    assert sched.on_trial_result(None, trial, {"step": 1, "metric": float("nan"), "size_bytes": 1,
                                               "latency_ms_b1": 1}) == CONTINUE
    assert "early" not in sched.rungs[1]


def test_a_trial_is_recorded_once_per_rung_at_the_highest_rung_it_reached():
    sched = _scheduler(max_t=16, reduction_factor=2)
    _report(sched, "jumper", 5, 90, 10, 1)  # past rungs 1, 2 and 4 in one report
    assert [m for m, r in sched.rungs.items() if "jumper" in r] == [4]
    _report(sched, "jumper", 6, 10, 99, 99)  # no new rung reached: nothing recorded, nothing decided
    assert sched.rungs[4]["jumper"] == [90, 10, 1]
    assert _report(sched, "jumper", 16, 90, 10, 1) == STOP  # max_t reached
    assert "jumper" in sched.rungs[16]


def test_save_and_restore_keep_the_rungs(tmp_path):
    sched = _scheduler(reduction_factor=2)
    for i in range(5):
        _report(sched, f"t{i}", 1, 80 + i, 10 + i, 1 + i)
    sched.save(str(tmp_path / "state.pkl"))
    fresh = _scheduler(reduction_factor=2)
    fresh.restore(str(tmp_path / "state.pkl"))
    assert fresh.rungs == sched.rungs
    assert _report(fresh, "bad", 1, 70, 100, 50) == STOP


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="objectives"):
        _scheduler(objectives=(("metric", "up"),))
    with pytest.raises(ConfigError, match="grace_period"):
        _scheduler(grace_period=32)
    with pytest.raises(ConfigError, match="reduction_factor"):
        _scheduler(reduction_factor=1)


# --------------------------------------------------------------------------- objectives known before training

@pytest.fixture(scope="module")
def tiny_prepared(tiny_teacher_dir, tiny_task_dir, tmp_path_factory):
    from common.trial_config import TrainConfig
    from workers.data import TaskConfig, load
    from workers.teacher import prepare

    data = load(TaskConfig(dataset=str(tiny_task_dir), train_size=128, eval_size=64, max_length=32))
    return prepare(str(tiny_teacher_dir), data, TrainConfig(lr=1e-3, epochs=1, batch_size=16),
                   tmp_path_factory.mktemp("teachers"))


def _context(t, out_dir, **kw):
    from workers.trial import TrialContext

    return TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                        teacher_logits=t.train_logits, metric="accuracy", out_dir=str(out_dir), seq_len=16,
                        latency_runs=3, **kw)


@pytest.mark.parametrize("compression", [
    {"prune": {"kind": "heads", "sparsity": 0.5, "importance": "magnitude"}, "quant": {"mode": "dynamic"}},
    {"prune": {"kind": "unstructured", "sparsity": 0.6}},
    {"lowrank": {"ratio": 0.25}, "quant": {"mode": "int4", "group_size": 32}},
])
def test_every_report_carries_the_size_the_artifact_will_have(tiny_prepared, tmp_path, compression):
    from common.trial_config import TrialConfig
    from workers.trial import run

    cfg = TrialConfig.model_validate({"student": {"layers": 1}, **compression,
                                      "train": {"max_steps": 6, "batch_size": 16, "eval_every": 2}})
    reports = []
    result = run(cfg, _context(tiny_prepared, tmp_path / "t", report=lambda m, c: reports.append(m)))
    assert [r["step"] for r in reports] == [2, 4]
    assert {r["size_bytes"] for r in reports} == {result["size_bytes"]}  # known from the first report, exact
    assert all(r["latency_ms_b1"] > 0 for r in reports) and len({r["latency_ms_b1"] for r in reports}) == 1


def test_a_config_over_the_size_limit_is_never_trained(tiny_prepared, tmp_path, monkeypatch):
    import workers.distill
    from common.trial_config import TrialConfig
    from workers.trial import run

    trained = []
    real = workers.distill.distill
    monkeypatch.setattr(workers.distill, "distill", lambda *a, **kw: trained.append(1) or real(*a, **kw))
    cfg = TrialConfig.model_validate({"student": {"layers": 2}, "train": {"max_steps": 4, "batch_size": 16,
                                                                          "eval_every": 2}})
    reports = []
    limit = tiny_prepared.metrics["size_bytes"] / 2  # the uncompressed 2-layer student is the teacher's size
    result = run(cfg, _context(tiny_prepared, tmp_path / "big", report=lambda m, c: reports.append(m),
                               max_size_bytes=limit))
    assert result["infeasible"] is True and result["train_steps"] == 0
    assert result["size_bytes"] > limit and result["metric"] == 0.0
    assert trained == [] and reports == [] and not (tmp_path / "big").exists()
    assert "constraints.max_size_mb" in result["stopped_by"]

    small = TrialConfig.model_validate({"student": {"layers": 1}, "quant": {"mode": "dynamic"},
                                        "train": {"max_steps": 4, "batch_size": 16}})
    result = run(small, _context(tiny_prepared, tmp_path / "small", max_size_bytes=limit))
    assert trained == [1] and result["train_steps"] == 4 and "infeasible" not in result
    assert result["size_bytes"] <= limit


def test_the_store_shows_an_infeasible_trial_as_stopped_without_a_metric(tmp_path):
    from db import Store
    from orchestrator.recorder import Recorder

    store = Store(f"sqlite:///{tmp_path}/s.db")
    store.create_job("j", "tiny", {}, teacher="t", dataset="d")
    recorder = Recorder(store.url, "j", None)
    trial = SimpleNamespace(trial_id="big", config={}, last_result={
        "infeasible": True, "final": True, "metric": 0.0, "metric_drop": 90.0, "size_bytes": 9_000_000,
        "latency_ms_b1": 3.0, "step": 0, "stopped_by": "infeasible: 9.000 MB before training, over ..."})
    store.trial_started("j", "big", {"student": {"layers": 2}})
    recorder.on_trial_complete(0, [trial], trial)
    recorder.on_experiment_end([trial])  # the recorder writes in the background; the search's end drains it
    [row] = store.trials("j")
    assert row["status"] == "stopped_early" and row["metric"] is None and row["size_bytes"] == 9_000_000
    assert row["result"]["infeasible"] is True and row["result"]["stopped_by"].startswith("infeasible")
    assert row["artifact_uri"] is None


# --------------------------------------------------------------------------- a real Tune run

@pytest.fixture(scope="module")
def local_ray():
    import os

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if ray.is_initialized():
        yield
        return
    connect(None, num_cpus=2)
    yield
    ray.shutdown()


def test_tiny_tune_run_stops_some_trials_and_never_a_front_member(local_ray, tmp_path):
    from ray import tune

    from search.mo_asha import MOASHAScheduler

    rng = random.Random(0)
    points = [(rng.randrange(100, 1000), rng.uniform(50, 100)) for _ in range(16)]

    def trainable(config):  # size and latency are known from the first report; the metric climbs by quality
        size, quality = points[config["i"]]
        for step in range(1, 9):
            tune.report({"step": step, "metric": quality * (1 - 0.5 ** step), "size_bytes": size,
                         "latency_ms_b1": size / 10})

    scheduler = MOASHAScheduler(time_attr="step", objectives=THREE, max_t=8, grace_period=1, reduction_factor=2)
    tuner = tune.Tuner(
        trainable, param_space={"i": tune.grid_search(list(range(len(points))))},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="mo", verbose=0))
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == len(points)

    steps = {r.metrics["trial_id"]: r.metrics["step"] for r in results}
    stopped = [trial_id for trial_id, step in steps.items() if step < 8]
    assert stopped, steps  # some trials were cut short
    assert scheduler.num_stopped >= len(stopped)
    # each stopped trial was, when it arrived at the rung where it stopped, off that rung's front
    for trial_id in stopped:
        recorded = scheduler.rungs[steps[trial_id]]
        ids = list(recorded)
        seen = [recorded[i] for i in ids[:ids.index(trial_id) + 1]]
        assert len(seen) - 1 not in front(seen, ["max", "min", "min"]), (trial_id, steps[trial_id], seen)


# --------------------------------------------------------------------------- a whole job

@pytest.mark.slow
def test_a_job_with_a_size_limit_trains_only_feasible_configs_and_ranks_on_size_from_the_start(
        tiny_teacher_dir, tmp_path, local_ray):
    from conftest import tiny_job
    from db import Store
    from orchestrator.jobs import submit
    from orchestrator.retention import gc
    from orchestrator.spec import parse

    # the tiny teacher is ~0.57 MB in fp32: no fp32 student fits 0.3 MB, both int8 ones do
    raw = tiny_job(tiny_teacher_dir, tmp_path, search={"student": {"layers": [1, 2]}, "prune": {"kind": "none"},
                                                       "quant": {"mode": ["none", "dynamic"]}},
                   algorithm={"name": "grid", "asha": "mo"}, budget={"num_trials": 1, "max_concurrent": 1},
                   constraints={"max_size_mb": 0.3})
    job_id = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    trials = {(t["config"]["student"]["layers"], (t["config"].get("quant") or {}).get("mode", "none")): t
              for t in store.trials(job_id)}
    assert len(trials) == 4
    for key, t in trials.items():
        history = store.metric_history(job_id, t["trial_id"])
        if key[1] == "none":  # over the limit: one report, no training, no artifact, no metric
            assert t["status"] == "stopped_early" and t["result"]["infeasible"] is True, t
            assert t["size_bytes"] > 0.3e6 and t["metric"] is None and t["artifact_uri"] is None
            assert history == [] and not t["on_front"]
        else:  # trained; size and latency rode along with every intermediate report
            assert t["status"] in ("terminated", "stopped_early") and t["size_bytes"] <= 0.3e6
            assert history and all(h["values"]["latency_ms_b1"] > 0 for h in history)
            if t["status"] == "terminated":
                assert {h["values"]["size_bytes"] for h in history} == {t["size_bytes"]}
    kept = set(gc(job_id, keep_top=0, store=store).kept)
    assert kept == {t["trial_id"] for t in trials.values() if t["on_front"]} and kept
