"""search.algorithms: settings validation, what make() builds, and a real multi-objective Tune run."""
from __future__ import annotations

import json
import os

import pytest
import hypothesis
from hypothesis import strategies as st

from pydantic import TypeAdapter

from search.adapters import to_trial_config
from search.algorithms import SearchSettings, make, param_space_for
from search.objectives import Objective, Objectives
from search.space import SearchSpace
from common.errors import SpecError
from common.raylink import connect

SPACE = SearchSpace.model_validate({
    "student": {"layers": [2, 3]},
    "prune": {"kind": ["none", "heads"], "sparsity": {"low": 0.2, "high": 0.7}},
    "train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}},
    "distill": {"alpha": 0.5},
})
TWO = (Objective(name="metric", mode="max"), Objective(name="size_bytes", mode="min"))


def _round_trip(settings):
    return SearchSettings.model_validate(json.loads(json.dumps(settings.model_dump(mode="json"))))


# --------------------------------------------------------------------------- settings

def test_defaults_and_json_round_trip():
    default = SearchSettings()
    assert default.name == "tpe" and default.asha == "metric" and default.time_attr == "step"
    assert default.asha_metric == "metric" and default.asha_mode == "max"
    custom = SearchSettings(name="nsga2", asha="mo", max_t=8, grace_period=2, reduction_factor=3, seed=None)
    for settings in (default, custom):
        assert _round_trip(settings) == settings
    assert SearchSettings.model_validate({}) == default


def test_settings_stored_by_earlier_versions_load():
    assert SearchSettings.model_validate({"algorithm": "random", "asha": True}) == \
        SearchSettings(name="random", asha="metric")
    assert SearchSettings.model_validate({"name": "tpe", "asha": False}).asha == "none"


def test_objectives_accept_pairs_strings_and_mappings():
    expected = (Objective(name="metric", mode="max"), Objective(name="latency_ms_b1", mode="min"))
    adapter = TypeAdapter(Objectives)
    for given in ([["metric", "max"], ["latency_ms_b1", "min"]], ("metric:max", "latency_ms_b1 : min"),
                  [{"metric": "max"}, {"name": "latency_ms_b1", "mode": "min"}]):
        assert adapter.validate_python(given) == expected
    assert [str(o) for o in expected] == ["metric:max", "latency_ms_b1:min"]


def test_every_problem_is_collected():
    with pytest.raises(SpecError) as info:
        SearchSettings.model_validate({"name": "bayes", "asha": "yes", "asha_metric": "loss", "max_t": 0,
                                       "grace_period": 0, "reduction_factor": 1, "seed": -1, "time_attr": "",
                                       "colour": "red"})
    problems = info.value.problems
    for start in ("algorithm.colour: unknown key", "algorithm.name: must be one of tpe|nsga2|random|grid, got 'bayes'",
                  "algorithm.asha: must be one of mo|metric|none, got 'yes'",
                  "algorithm.asha_metric: must be one of metric|", "algorithm.time_attr: must not be empty",
                  "algorithm.max_t: must be ≥ 1, got 0", "algorithm.grace_period: must be ≥ 1, got 0",
                  "algorithm.reduction_factor: must be > 1, got 1", "algorithm.seed: must be ≥ 0, got -1"):
        assert any(p.startswith(start) for p in problems), (start, problems)
    assert len(problems) == 9


def test_inconsistent_settings():
    with pytest.raises(SpecError, match=r"algorithm\.grace_period: must be ≤ max_t \(3\), got 5"):
        SearchSettings(max_t=3, grace_period=5)


_FIELDS = ["name", "algorithm", "asha", "asha_metric", "asha_mode", "time_attr", "max_t", "grace_period",
           "reduction_factor", "seed", "bogus"]
_JUNK = st.recursive(st.none() | st.booleans() | st.integers(-5, 2 ** 40) | st.floats() | st.text(max_size=4)
                     | st.sampled_from(["tpe", "grid", "max", "min", "metric", "mo", "none", "step"]),
                     lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3),
                     max_leaves=10)


@hypothesis.settings(max_examples=200, deadline=None)
@hypothesis.given(st.dictionaries(st.sampled_from(_FIELDS), _JUNK, max_size=6) | _JUNK)
def test_junk_settings_are_a_spec_error_or_round_trip(d):
    try:
        parsed = SearchSettings.model_validate(d)
    except SpecError as err:
        assert err.problems and all("\n" not in p for p in err.problems)
        return
    assert _round_trip(parsed) == parsed


# --------------------------------------------------------------------------- make / param_space_for

def test_make_tpe_is_multi_objective_optuna_with_asha():
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    settings = SearchSettings(asha_metric="metric", max_t=9, reduction_factor=3, seed=7)
    search_alg, scheduler = make(SPACE, settings, TWO)
    assert isinstance(search_alg, OptunaSearch)
    assert search_alg.metric == ["metric", "size_bytes"] and search_alg.mode == ["max", "min"]
    assert isinstance(search_alg._sampler, optuna.samplers.TPESampler)
    assert isinstance(scheduler, ASHAScheduler)
    assert (scheduler.metric, scheduler._mode, scheduler._time_attr, scheduler._max_t) == ("metric", "max", "step", 9)
    assert param_space_for(SPACE, settings) == {}  # the space lives in the searcher
    # seeded: a second searcher suggests the same configs, and they respect the gate
    again, _ = make(SPACE, settings, TWO)
    first = [search_alg.suggest(f"t{i}") for i in range(6)]
    assert first == [again.suggest(f"t{i}") for i in range(6)]
    assert all(("prune.sparsity" in c) == (c["prune.kind"] == "heads") for c in first)
    assert all(c["distill.alpha"] == 0.5 for c in first)


def test_make_nsga2_and_fifo():
    import optuna
    from ray.tune.schedulers import FIFOScheduler

    search_alg, scheduler = make(SPACE, SearchSettings(name="nsga2", asha="none"), TWO)
    assert isinstance(search_alg._sampler, optuna.samplers.NSGAIISampler)
    assert type(scheduler) is FIFOScheduler


def test_mo_builds_multi_objective_asha_on_the_objectives():
    from search.mo_asha import MOASHAScheduler

    _, scheduler = make(SPACE, SearchSettings(asha="mo", max_t=8, grace_period=2, reduction_factor=2), TWO)
    assert isinstance(scheduler, MOASHAScheduler)
    assert scheduler._names == ["metric", "size_bytes"] and scheduler._directions == ["max", "min"]


def test_random_and_grid_use_the_variant_generator_with_a_param_space():
    from ray.tune.search.basic_variant import BasicVariantGenerator
    from ray.tune.search.sample import Domain

    random = SearchSettings(name="random")
    search_alg, _ = make(SPACE, random, TWO)
    assert isinstance(search_alg, BasicVariantGenerator)
    space = param_space_for(SPACE, random)
    assert set(space) == {"student.layers", "prune.kind", "prune.sparsity", "train.lr", "distill.alpha"}
    assert isinstance(space["prune.kind"], Domain) and space["distill.alpha"] == 0.5

    grid = param_space_for(SPACE, SearchSettings(name="grid"))
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
    connect(None, num_cpus=2)
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

    settings = SearchSettings(max_t=3, grace_period=1, reduction_factor=2, seed=0)
    search_alg, scheduler = make(SPACE, settings, TWO)
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


def test_tpe_start_up_fits_the_trial_budget():
    from search.algorithms import startup_trials

    assert startup_trials(SearchSettings(), None) == 10  # Optuna's default when the budget is unknown
    assert startup_trials(SearchSettings(), 6) == 3  # a small search still gets modelled trials
    assert startup_trials(SearchSettings(), 12) == 4
    assert startup_trials(SearchSettings(), 1000) == 10
    assert startup_trials(SearchSettings(startup_trials=7), 6) == 7
    searcher, _ = make(SPACE, SearchSettings(name="tpe"), TWO, num_trials=12)
    assert searcher._sampler._n_startup_trials == 4
