"""search.algorithms: settings validation, what make() builds, and a real multi-objective Tune run."""
from __future__ import annotations

import json
import os

import pytest
import hypothesis
from hypothesis import strategies as st

from search.algorithms import SearchSettings, make, param_space_for
from search.objectives import OBJECTIVES
from search.space import SearchSpace, to_trial_config
from common.errors import SpecError

SPACE = SearchSpace.from_dict({
    "student": {"layers": [2, 3]},
    "prune": {"kind": ["none", "heads"], "sparsity": {"low": 0.2, "high": 0.7}},
    "train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}},
    "distill": {"alpha": 0.5},
})
TWO = (("metric", "max"), ("size_bytes", "min"))


# --------------------------------------------------------------------------- settings

def test_defaults_and_json_round_trip():
    default = SearchSettings()
    assert default.algorithm == "tpe" and default.asha and default.time_attr == "step"
    assert default.asha_metric == "metric" and default.asha_mode == "max"
    custom = SearchSettings(algorithm="nsga2", objectives=TWO, asha=False, max_t=8, grace_period=2,
                            reduction_factor=3, seed=None)
    for settings in (default, custom):
        assert SearchSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings
    assert SearchSettings.from_dict(None) == default


def test_objectives_accept_pairs_strings_and_mappings():
    expected = (("metric", "max"), ("latency_ms_b1", "min"))
    for given in ([["metric", "max"], ["latency_ms_b1", "min"]], ["metric:max", "latency_ms_b1 : min"],
                  {"metric": "max", "latency_ms_b1": "min"}):
        assert SearchSettings(objectives=given).objectives == expected


def test_unknown_objective_names_it_and_lists_the_known_ones():
    with pytest.raises(SpecError) as info:
        SearchSettings(objectives=(("accuracy", "max"), ("size_bytes", "min")))
    [line] = info.value.problems
    assert "'accuracy'" in line and line.startswith("objectives[0]:")
    assert all(name in line for name in OBJECTIVES)


def test_every_problem_is_collected():
    with pytest.raises(SpecError) as info:
        SearchSettings.from_dict({"algorithm": "bayes", "objectives": ["metric:max", "size_bytes:smallest", 3],
                                  "asha": "yes", "asha_metric": "loss", "max_t": 0, "grace_period": 0,
                                  "reduction_factor": 1, "seed": -1, "time_attr": "", "colour": "red"})
    problems = info.value.problems
    for start in ("colour: unknown key", "algorithm: must be one of tpe|nsga2|random|grid, got 'bayes'",
                  "objectives[1]: direction must be max or min, got 'smallest'",
                  "objectives[2]: must be a (name, max|min) pair, got 3", "asha: must be true or false",
                  "asha_metric: no trial reports 'loss'", "time_attr: must be the name", "max_t: must be an integer",
                  "grace_period: must be an integer", "reduction_factor: must be a number > 1",
                  "seed: must be an integer in [0, 2^32)"):
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == 11


@pytest.mark.parametrize("kwargs, expected", [
    (dict(objectives=(("metric_drop", "min"), ("size_bytes", "min")), asha_metric="metric_drop"),
     "asha_mode: max contradicts objective metric_drop:min"),
    (dict(max_t=3, grace_period=5), "grace_period: must be ≤ max_t (3), got 5"),
    (dict(objectives=(("metric", "max"), ("metric", "min"))), "objectives[1]: metric is listed twice"),
    (dict(objectives=()), "objectives: must be a non-empty list"),
    (dict(asha_mode="up"), "asha_mode: must be max or min"),
])
def test_inconsistent_settings(kwargs, expected):
    with pytest.raises(SpecError) as info:
        SearchSettings(**kwargs)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


_FIELDS = ["algorithm", "objectives", "asha", "asha_metric", "asha_mode", "time_attr", "max_t", "grace_period",
           "reduction_factor", "seed", "bogus"]
_JUNK = st.recursive(st.none() | st.booleans() | st.integers(-5, 2 ** 40) | st.floats() | st.text(max_size=4)
                     | st.sampled_from(["tpe", "grid", "max", "min", "metric", "size_bytes", "metric:max", "step"]),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                     max_leaves=10)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.dictionaries(st.sampled_from(_FIELDS), _JUNK, max_size=6) | _JUNK)
def test_junk_settings_are_a_spec_error_or_round_trip(d):
    try:
        parsed = SearchSettings.from_dict(d)
    except SpecError as err:
        assert err.problems
        return
    assert SearchSettings.from_dict(json.loads(json.dumps(parsed.to_dict()))) == parsed


# --------------------------------------------------------------------------- make / param_space_for

def test_make_tpe_is_multi_objective_optuna_with_asha():
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    settings = SearchSettings(objectives=TWO, asha_metric="metric", max_t=9, reduction_factor=3, seed=7)
    search_alg, scheduler = make(SPACE, settings)
    assert isinstance(search_alg, OptunaSearch)
    assert search_alg.metric == ["metric", "size_bytes"] and search_alg.mode == ["max", "min"]
    assert isinstance(search_alg._sampler, optuna.samplers.TPESampler)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler.metric, scheduler._mode, scheduler._time_attr, scheduler._max_t) == ("metric", "max", "step", 9)
    assert param_space_for(SPACE, settings) == {}  # the space lives in the searcher
    # seeded: a second searcher suggests the same configs, and they respect the gate
    again, _ = make(SPACE, settings)
    first = [search_alg.suggest(f"t{i}") for i in range(6)]
    assert first == [again.suggest(f"t{i}") for i in range(6)]
    assert all(("prune.sparsity" in c) == (c["prune.kind"] == "heads") for c in first)
    assert all(c["distill.alpha"] == 0.5 for c in first)


def test_make_nsga2_and_fifo():
    import optuna
    from ray.tune.schedulers import FIFOScheduler

    search_alg, scheduler = make(SPACE, SearchSettings(algorithm="nsga2", objectives=TWO, asha=False))
    assert isinstance(search_alg._sampler, optuna.samplers.NSGAIISampler)
    assert isinstance(scheduler, FIFOScheduler)


def test_random_and_grid_use_the_variant_generator_with_a_param_space():
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.sample import Domain

    random = SearchSettings(algorithm="random", objectives=TWO)
    search_alg, _ = make(SPACE, random)
    assert isinstance(search_alg, BasicVariantGenerator)
    space = param_space_for(SPACE, random)
    assert set(space) == {"student.layers", "prune.kind", "prune.sparsity", "train.lr", "distill.alpha"}
    assert isinstance(space["prune.kind"], Domain) and space["distill.alpha"] == 0.5

    grid = param_space_for(SPACE, SearchSettings(algorithm="grid", objectives=TWO))
    assert grid["student.layers"] == {"grid_search": [2, 3]}
    assert grid["prune.kind"] == {"grid_search": ["none", "heads"]}
    assert isinstance(grid["train.lr"], Domain)  # ranges have no grid: drawn at each grid point


# --------------------------------------------------------------------------- a real Tune run

@pytest.fixture(scope="module")
def local_ray():
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if ray.is_initialized():  # a session-wide Ray from elsewhere in the suite
        yield
        return
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield
    ray.shutdown()


def test_tiny_multi_objective_tpe_run_with_asha(local_ray, tmp_path):
    from ray import tune

    def trainable(config):  # defined here so Ray ships it by value: workers cannot import this test module
        cfg = to_trial_config(config)
        sparsity = cfg["prune"].get("sparsity", 0.0)
        for step in range(1, 4):
            tune.report({"step": step, "metric": 0.5 + 0.1 * step - sparsity / 10,
                         "size_bytes": int(1000 * (1 - sparsity)), "has_sparsity": "sparsity" in cfg["prune"]})

    settings = SearchSettings(objectives=TWO, max_t=3, grace_period=1, reduction_factor=2, seed=0)
    search_alg, scheduler = make(SPACE, settings)
    tuner = tune.Tuner(
        trainable, param_space=param_space_for(SPACE, settings),
        # no metric/mode here: the searcher and ASHA carry their own
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=4,
                                    max_concurrent_trials=2, reuse_actors=True),
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="search", verbose=0))
    results = tuner.fit()
    assert results.num_errors == 0 and len(results) == 4
    for result in results:
        assert 1 <= result.metrics["step"] <= 3
        assert {"metric", "size_bytes"} <= set(result.metrics)
        assert result.metrics["has_sparsity"] == (result.config["prune.kind"] == "heads")
        assert "prune.sparsity" not in result.config or result.config["prune.kind"] == "heads"
        assert 1e-5 <= result.config["train.lr"] <= 1e-3
    # the searcher got every trial's objectives back: Optuna's study holds 4 completed trials
    import optuna

    done = search_alg._ot_study.get_trials(states=[optuna.trial.TrialState.COMPLETE])
    assert len(done) == 4 and all(len(t.values) == 2 for t in done)
