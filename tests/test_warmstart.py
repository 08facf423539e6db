"""Warm start's pure filter (stored trial config -> the new space's flat params) and the seeding of an Optuna
searcher, on plain dicts; no Ray cluster, no store."""
import pytest

from search.adapters import trial_config
from search.algorithms import SearchSettings, make
from search.objectives import Objective
from search.space import SearchSpace
from search.warmstart import flat_params, seed, study_of
from common.trial_config import TrialConfig

SPACE = SearchSpace.model_validate({
    "student": {"layers": [1, 2]},
    "prune": {"kind": ["none", "heads"], "sparsity": {"low": 0.2, "high": 0.6}},
    "quant": {"mode": ["none", "dynamic"]},
    "lowrank": {"ratio": [0, 0.5]},
    "distill": {"alpha": 0.5},
    "train": {"lr": {"low": 1e-4, "high": 1e-3, "log": True}},
})
BASE = TrialConfig()
OBJECTIVES = tuple(Objective.model_validate(o) for o in ("metric:max", "size_bytes:min"))


def stored(flat: dict, base: TrialConfig = BASE) -> dict:
    """What the Recorder keeps of a sampled point."""
    return trial_config(flat, base).model_dump(mode="json", exclude_none=True)


POINT = {"student.layers": 2, "prune.kind": "heads", "prune.sparsity": 0.3, "quant.mode": "dynamic",
         "lowrank.ratio": 0.5, "distill.alpha": 0.5, "train.lr": 3e-4}


def test_a_config_inside_the_space_gives_back_the_suggested_params():
    assert flat_params(stored(POINT), SPACE, BASE) == {k: v for k, v in POINT.items() if k != "distill.alpha"}


def test_switched_off_knobs_are_not_suggested():
    off = {**POINT, "prune.kind": "none", "lowrank.ratio": 0.0, "quant.mode": "none"}
    config = stored(off)
    assert "prune" not in config and "lowrank" not in config  # how the store keeps "off"
    assert flat_params(config, SPACE, BASE) == {"student.layers": 2, "prune.kind": "none", "quant.mode": "none",
                                                "lowrank.ratio": 0.0, "train.lr": 3e-4}


@pytest.mark.parametrize("change", [
    {"student.layers": 3},          # not one of the choices
    {"prune.sparsity": 0.7},        # outside the range
    {"train.lr": 2e-3},             # outside the log range
    {"distill.alpha": 0.9},         # the new space fixes it to 0.5
    {"quant.mode": "int4"},         # a mode the new space does not search
])
def test_a_config_outside_the_space_is_refused(change):
    config = stored({**POINT, **change})
    assert flat_params(config, SPACE, BASE) is None


def test_a_knob_the_space_does_not_search_must_equal_the_new_jobs_default():
    other_defaults = TrialConfig.model_validate({"train": {"batch_size": 64}})
    assert flat_params(stored(POINT, other_defaults), SPACE, BASE) is None
    assert flat_params(stored(POINT, other_defaults), SPACE, other_defaults) is not None


def test_a_knob_the_old_job_searched_but_the_new_one_does_not_must_equal_the_default():
    narrow = SearchSpace.model_validate({"student": {"layers": [1, 2]}})
    assert flat_params(stored({"student.layers": 1}), narrow, BASE) == {"student.layers": 1}
    assert flat_params(stored({"student.layers": 1, "train.lr": 3e-4}), narrow, BASE) is None


def test_junk_is_outside():
    assert flat_params(None, SPACE, BASE) is None
    assert flat_params({"student": {"layers": "two"}}, SPACE, BASE) is None


def test_seeded_points_are_completed_trials_of_the_study_and_the_sampler_goes_on_from_them():
    searcher, _ = make(SPACE, SearchSettings(name="tpe"), OBJECTIVES, max_concurrent=2)
    points = [(flat_params(stored(POINT), SPACE, BASE), [80.0, 1e6]),
              (flat_params(stored({**POINT, "prune.kind": "none", "student.layers": 1}), SPACE, BASE), [75.0, 5e5]),
              ({"student.layers": 1, "prune.kind": "none", "quant.mode": "none", "lowrank.ratio": 0.0,
                "train.lr": 2e-4}, [float("nan"), 1.0])]  # a value that is not a measurement is not seeded
    assert seed(searcher, SPACE, points) == 2
    study = study_of(searcher)
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert [t.params for t in done] == [points[0][0], points[1][0]]
    assert [t.values for t in done] == [[80.0, 1e6], [75.0, 5e5]]
    config = searcher.suggest("next")  # the define-by-run space asks with the very distributions seeded
    assert config["distill.alpha"] == 0.5 and len(study.trials) == 3


def test_nsga2_takes_the_seeds_as_its_first_generation():
    searcher, _ = make(SPACE, SearchSettings(name="nsga2"), OBJECTIVES)
    point = flat_params(stored(POINT), SPACE, BASE)
    assert seed(searcher, SPACE, [(point, [80.0, 1e6]), (point, [79.0, 9e5])]) == 2
    sampler = study_of(searcher).sampler
    assert [sampler.get_trial_generation(study_of(searcher), t) for t in study_of(searcher).trials] == [0, 0]
    assert searcher.suggest("next") is not None


def test_random_search_has_no_study_to_seed():
    searcher, _ = make(SPACE, SearchSettings(name="random"), OBJECTIVES)
    assert study_of(searcher) is None
    assert seed(searcher, SPACE, [({"student.layers": 1}, [1.0, 1.0])]) == 0


@pytest.mark.parametrize("raw, line", [
    (3, "search.warm_start: must be auto or a list of job ids, got 3"),
    ([], "search.warm_start: must be auto or a list of job ids, got []"),
    (["a", "a"], "search.warm_start: lists a job twice"),
])
def test_warm_start_is_auto_or_job_ids_with_one_line_errors(raw, line):
    from common.errors import SpecError
    from orchestrator.spec import parse

    with pytest.raises(SpecError, match=line.replace("[", r"\[").replace("]", r"\]")):
        parse({"name": "x", "search": {"student": {"layers": [1, 2]}, "warm_start": raw}})
    for ok in ("auto", ["job-1", "job-2"]):
        spec = parse({"name": "x", "search": {"student": {"layers": [1, 2]}, "warm_start": ok}})
        assert parse(spec.model_dump(mode="json")) == spec  # round-trips through the stored form
