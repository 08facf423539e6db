"""search.space: parsing and validation, Tune/Optuna sampling with real conditionals, trial configs."""
from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from search.adapters import build, optuna_space, to_trial_config, trial_config
from search.space import DIMENSIONS, SECTIONS, Choice, Fixed, Range, SearchSpace
from common.errors import ConfigError, SpecError

ROOT = Path(__file__).resolve().parents[1]

EXAMPLE = {
    "student": {"layers": [2, 3, 4], "hidden": {"low": 64, "high": 256, "step": 64}},
    "prune": {"kind": ["none", "unstructured", "heads"], "sparsity": {"low": 0.2, "high": 0.7},
              "importance": ["gradient", "magnitude"]},
    "quant": {"mode": ["none", "dynamic", "int4"], "group_size": [32, 64]},
    "lowrank": {"ratio": [0, 0.5]},
    "distill": {"temperature": 2, "alpha": {"low": 0.5, "high": 1.0}},
    "train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}, "epochs": 1},
}

EVERY_DIMENSION = {
    "student": {"layers": {"low": 1, "high": 6}, "layer_choice": ["uniform", "top"], "hidden": [128, 256],
                "heads": 4, "ffn": {"low": 256, "high": 1024, "log": True}},
    "prune": {"kind": ["none", "ffn", "structured"], "sparsity": {"low": 0.1, "high": 0.9, "step": 0.1},
              "importance": "magnitude"},
    "quant": {"mode": ["int4", "qat", "mixed", "static"], "group_size": 128, "embedding_bits": [4, 8]},
    "lowrank": {"ratio": {"low": 0.25, "high": 1.0}},
    "vocab": {"prune": [False, True]},
    "distill": {"temperature": {"low": 1, "high": 8, "log": True}, "alpha": 0.9, "hidden_weight": [0, 1.5],
                "attention_weight": 0.0},
    "train": {"lr": [1e-4, 3e-4], "epochs": {"low": 1, "high": 3, "step": 1}},
}


def problems_of(d) -> list[str]:
    with pytest.raises(SpecError) as info:
        SearchSpace.model_validate(d)
    return info.value.problems


# --------------------------------------------------------------------------- cheap import

def test_import_search_loads_no_ray_optuna_or_torch():
    code = ("import sys, search, search.space, search.algorithms, search.pareto, search.objectives\n"
            "from search import *\n"
            "print(','.join(m for m in ('ray', 'optuna', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


# --------------------------------------------------------------------------- parsing

def test_example_parses_into_typed_dimensions():
    space = SearchSpace.model_validate(EXAMPLE)
    assert space.get("student.layers") == Choice((2, 3, 4))
    assert space.get("student.hidden") == Range(64, 256, False, 64)
    assert space.get("prune.sparsity") == Range(0.2, 0.7)
    assert space.get("train.lr") == Range(1e-5, 1e-3, log=True)
    assert space.get("distill.temperature") == Fixed(2.0)  # float knob: int normalised
    assert isinstance(space.get("distill.temperature").value, float)
    assert space.get("lowrank.ratio") == Choice((0.0, 0.5))
    assert space.get("student.ffn") is None
    # gating parents come before what they gate, whatever the YAML order
    names = [n for n, _ in space.dims]
    assert names.index("prune.kind") < names.index("prune.sparsity")


@pytest.mark.parametrize("d", [EXAMPLE, EVERY_DIMENSION, {}, {"prune": None}])
def test_json_round_trip(d):
    space = SearchSpace.model_validate(d)
    again = SearchSpace.model_validate(json.loads(json.dumps(space.model_dump(mode="json"))))
    assert again == space
    assert again.model_dump(mode="json") == space.model_dump(mode="json")


def test_every_dimension_is_reachable_from_yaml():
    space = SearchSpace.model_validate(EVERY_DIMENSION)
    assert [n for n, _ in space.dims] == list(DIMENSIONS)


def test_direct_construction_validates_too():
    assert SearchSpace(dims={"prune.kind": Fixed("heads"), "prune.sparsity": Fixed(0.5)}).get("prune.sparsity") == \
        Fixed(0.5)
    with pytest.raises(SpecError, match=r"search\.prune\.sparsity: must be a number in \[0, 1\), got 2\.0"):
        SearchSpace(dims={"prune.kind": Fixed("heads"), "prune.sparsity": Fixed(2.0)})
    with pytest.raises(SpecError, match="search.student.layers: .* must be a Choice"):
        SearchSpace(dims={"student.layers": Fixed([1, 2])})
    with pytest.raises(SpecError, match="search.student.layers: .* must be a Fixed"):
        SearchSpace(dims={"student.layers": Choice(5)})
    with pytest.raises(SpecError, match="search.student.layers.log: must be true or false"):
        SearchSpace(dims={"student.layers": Range(1, 4, log="no")})
    with pytest.raises(SpecError, match="search.student.depth: unknown dimension"):
        SearchSpace(dims={"student.depth": Fixed(2)})


def test_sparsity_high_names_the_full_path_and_what_is_allowed():
    [line] = problems_of({"prune": {"kind": "heads", "sparsity": {"low": 0.2, "high": 1.5}}})
    assert line == "search.prune.sparsity.high: must be a number in [0, 1), got 1.5"


def test_all_problems_are_collected():
    with pytest.raises(SpecError) as info:
        SearchSpace.model_validate({
            "student": {"layers": "three", "depth": 2},
            "prune": {"kind": ["none", "random"], "sparsity": {"low": 0.5, "high": 0.2}},
            "quant": {"mode": {"low": 1, "high": 2}},
            "teacher": {},
            "train": {"lr": {"low": 0, "high": 1e-3, "log": True}},
        })
    assert sorted(info.value.problems) == sorted([
        "search.student.layers: must be an integer in [1, 1000000], got 'three'",
        "search.student.depth: unknown key; allowed: layers, layer_choice, hidden, heads, ffn",
        "search.prune.kind[1]: must be one of none|unstructured|heads|ffn|structured, got 'random'",
        "search.prune.sparsity.high: must be > low (0.5), got 0.2; use a single value to fix it",
        "search.quant.mode: must be one of none|dynamic|static|qat|int4|mixed or a list of them, not a range",
        "search.teacher: unknown section; allowed: student, prune, quant, lowrank, vocab, distill, train",
        "search.train.lr.low: must be a number in (0, 1), got 0",
    ])
    assert str(info.value).startswith("7 problems")


@pytest.mark.parametrize("d, expected", [
    ("prune: heads", "search: must be a mapping of sections"),
    ({"prune": ["kind"]}, "search.prune: must be a mapping of kind, sparsity, importance"),
    ({"student": {"layers": True}}, "search.student.layers: must be an integer in [1, 1000000], got True"),
    ({"student": {"layers": 2.5}}, "search.student.layers: must be an integer"),
    ({"student": {"layers": None}}, "search.student.layers: empty; give a value"),
    ({"student": {"layers": []}}, "search.student.layers: empty list"),
    ({"student": {"layers": [2, 2]}}, "search.student.layers[1]: 2 is listed twice"),
    ({"student": {"layers": {"low": 2}}}, "search.student.layers.high: missing"),
    ({"student": {"layers": {"low": 2, "high": 4, "by": 1}}}, "unknown key(s) by in a range; allowed: low, high"),
    ({"student": {"layers": {"low": 2, "high": 4, "log": "yes"}}}, "search.student.layers.log: must be true or false"),
    ({"student": {"layers": {"low": 2, "high": 4, "step": 0.5}}}, "search.student.layers.step: must be an integer"),
    ({"student": {"layers": {"low": 2, "high": 5, "step": 2}}}, "must be a multiple of step (2)"),
    ({"train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True, "step": 1e-5}}}, "log and step cannot be combined"),
    ({"train": {"epochs": {"low": 0.1, "high": 0.5, "step": 1e-9}}}, "makes over 10000 points"),
    ({"distill": {"alpha": {"low": 0, "high": 1, "log": True}}}, "search.distill.alpha.low: must be > 0 when log"),
    ({"distill": {"temperature": float("nan")}}, "search.distill.temperature: must be a number in (0, 50], got nan"),
    ({"distill": {"hidden_weight": 10 ** 400}}, "search.distill.hidden_weight: must be a number ≥ 0"),
    ({"lowrank": {"ratio": {"low": 0, "high": 0.5}}}, "search.lowrank.ratio.low: 0.0 means off"),
    ({"lowrank": {"ratio": 1.5}}, "search.lowrank.ratio: must be a number in (0, 1], or 0 for off, got 1.5"),
    ({"quant": {"mode": "int4", "group_size": 48}}, "search.quant.group_size: must be one of 16|32|64|128|256"),
    ({"quant": {"mode": "int4", "group_size": {"low": 16, "high": 256}}}, "not a range"),
    ({"prune": {"sparsity": 0.5}}, "search.prune.sparsity: needs search.prune.kind"),
    ({"prune": {"kind": "none", "importance": "magnitude"}}, "search.prune.importance: never used"),
    ({"prune": {"kind": "unstructured", "importance": "magnitude"}}, "search.prune.importance: never used"),
    ({"quant": {"mode": ["none", "dynamic"], "group_size": 64}}, "search.quant.group_size: never used"),
    ({1: {}}, "search.1: unknown section"),
])
def test_malformed_spaces_name_the_field(d, expected):
    assert any(expected in p for p in problems_of(d)), problems_of(d)


# Keys that exist somewhere, so junk often reaches the deeper checks instead of failing at the top.
_KEYS = st.sampled_from(sorted({*SECTIONS, *(k for keys in SECTIONS.values() for k in keys),
                                "low", "high", "log", "step", "bogus", ""})) | st.integers(-2, 2)
_LEAVES = (st.none() | st.booleans() | st.integers(-10 ** 20, 10 ** 20) | st.floats(allow_nan=True)
           | st.integers(0, 300) | st.floats(0, 1) | st.sampled_from([16, 64, 0, 1, 1e-4, 0.5, 1.0])
           | st.sampled_from(["none", "heads", "unstructured", "int4", "dynamic", "uniform", "gradient"])
           | st.text(max_size=3))
_JUNK = st.recursive(_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
                     max_leaves=25)
_RANGE = st.dictionaries(st.sampled_from(["low", "high", "log", "step", "bogus"]), _LEAVES, max_size=5)
_DIM = _LEAVES | st.lists(_LEAVES, max_size=4) | _RANGE | st.fixed_dictionaries(
    {"low": _LEAVES, "high": _LEAVES}, optional={"log": st.booleans(), "step": _LEAVES})
# Mostly the right keys in the right sections, so the value checks and the gates get exercised.
_NEAR = st.fixed_dictionaries({}, optional={
    section: st.dictionaries(st.sampled_from([*keys, "bogus"]), _DIM, max_size=4) | _JUNK
    for section, keys in SECTIONS.items()})

_GOOD: dict = {}
for _d in (EXAMPLE, EVERY_DIMENSION):
    for _section, _body in _d.items():
        for _key, _v in _body.items():
            _GOOD.setdefault(_section, {}).setdefault(_key, []).append(_v)
# Valid values in any combination: most parse (some trip the gates), so the round trip gets exercised.
_GOODISH = st.fixed_dictionaries({}, optional={
    section: st.fixed_dictionaries({}, optional={key: st.sampled_from(vals) for key, vals in body.items()})
    for section, body in _GOOD.items()})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_GOODISH | _NEAR | st.dictionaries(st.sampled_from([*SECTIONS, "junk"]), _JUNK, max_size=6) | _JUNK)
def test_junk_is_a_spec_error_or_a_space_that_round_trips(d):
    try:
        space = SearchSpace.model_validate(d)
    except SpecError as err:
        assert err.problems and all(p.startswith("search") for p in err.problems)
        return
    assert SearchSpace.model_validate(json.loads(json.dumps(space.model_dump(mode="json")))) == space


# --------------------------------------------------------------------------- Tune param_space

def _tune_samples(param_space: dict, n: int) -> list[dict]:
    from ray.tune.search.variant_generator import generate_variants

    out = []
    while len(out) < n:
        out += [spec["config"] for _, spec in generate_variants({"config": param_space})]
    return out


def test_build_gates_sparsity_and_group_size_in_random_search():
    space = SearchSpace.model_validate(EXAMPLE)
    samples = _tune_samples(build(space), 300)
    kinds = {s["prune.kind"] for s in samples}
    assert kinds == {"none", "unstructured", "heads"}
    for flat in samples:
        cfg = to_trial_config(flat)
        if flat["prune.kind"] == "none":
            assert flat["prune.sparsity"] is None and flat["prune.importance"] is None
            assert cfg["prune"] == {"kind": "none"}
        else:
            assert 0.2 <= cfg["prune"]["sparsity"] <= 0.7
        assert ("importance" in cfg["prune"]) == (flat["prune.kind"] == "heads")
        assert (flat["quant.group_size"] is not None) == (flat["quant.mode"] == "int4")
        assert ("group_size" in cfg["quant"]) == (flat["quant.mode"] == "int4")
        assert cfg["student"]["layers"] in (2, 3, 4)
        assert cfg["student"]["hidden"] in (64, 128, 192, 256)
        assert 1e-5 <= cfg["train"]["lr"] <= 1e-3
        assert cfg["distill"]["temperature"] == 2.0
        assert ("lowrank" in cfg) == (flat["lowrank.ratio"] == 0.5)
    assert {s["student.hidden"] for s in samples} == {64, 128, 192, 256}  # high end included


def _inside(dim, value) -> bool:
    if isinstance(dim, Fixed):
        return value == dim.value
    if isinstance(dim, Choice):
        return value in dim.values
    on_grid = dim.step is None or math.isclose((value - dim.low) / dim.step, round((value - dim.low) / dim.step),
                                               abs_tol=1e-6)
    return dim.low <= value <= dim.high and on_grid and type(value) is type(dim.low)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_GOODISH)
def test_every_sample_lies_in_the_space(d):
    import optuna

    try:
        space = SearchSpace.model_validate(d)
    except SpecError:
        return
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    fn = optuna_space(space)
    optuna_samples = []
    for _ in range(5):
        trial = study.ask()
        optuna_samples.append({**trial.params, **fn(trial)})
    for flat in _tune_samples(build(space), 5) + optuna_samples:
        for name, value in flat.items():
            if value is not None:
                assert _inside(space.get(name), value), (name, value, space.get(name))


def test_build_leaves_knobs_plain_when_the_parent_is_always_on():
    from ray.tune.search.sample import Float, Function

    space = SearchSpace.model_validate({"prune": {"kind": ["heads", "ffn"], "sparsity": {"low": 0.1, "high": 0.5}}})
    assert isinstance(build(space)["prune.sparsity"], Float)
    gated = SearchSpace.model_validate({"prune": {"kind": ["none", "ffn"], "sparsity": {"low": 0.1, "high": 0.5}}})
    assert isinstance(build(gated)["prune.sparsity"], Function)


def test_integer_ranges_include_high_and_stepped_ranges_draw_optunas_grid():
    space = SearchSpace.model_validate({"student": {"layers": {"low": 1, "high": 5, "step": 2},
                                               "hidden": {"low": 64, "high": 192, "step": 64},
                                               "ffn": {"low": 1, "high": 3},
                                               "heads": {"low": 1, "high": 4, "log": True}},
                                   "prune": {"kind": "heads", "sparsity": {"low": 0.1, "high": 0.5, "step": 0.2}}})
    samples = _tune_samples(build(space), 200)
    assert {s["student.layers"] for s in samples} == {1, 3, 5}  # low + k*step, though 1 is no multiple of 2
    assert {s["student.hidden"] for s in samples} == {64, 128, 192}
    assert {s["student.ffn"] for s in samples} == {1, 2, 3}
    assert {s["student.heads"] for s in samples} == {1, 2, 3, 4}
    assert {s["prune.sparsity"] for s in samples} == {0.1, 0.3, 0.5}


def test_grid_enumerates_ungated_choices_only():
    space = SearchSpace.model_validate(EXAMPLE)
    grid = _tune_samples(build(space, grid=True), 1)
    # layers 3 x kind 3 x mode 3 x lowrank 2, once each; importance / group_size are drawn per point
    assert len(grid) == 54
    assert len({(g["student.layers"], g["prune.kind"], g["quant.mode"], g["lowrank.ratio"]) for g in grid}) == 54
    assert all((g["prune.sparsity"] is None) == (g["prune.kind"] == "none") for g in grid)


def test_param_space_and_optuna_space_pickle():
    space = SearchSpace.model_validate(EXAMPLE)
    fn = pickle.loads(pickle.dumps(optuna_space(space)))
    assert fn.space == space
    again = pickle.loads(pickle.dumps(build(space)))
    assert set(again) == {n for n, _ in space.dims}


# --------------------------------------------------------------------------- Optuna define-by-run

@pytest.mark.parametrize("sampler_name", ["RandomSampler", "TPESampler"])
def test_optuna_space_only_suggests_sparsity_when_pruning(sampler_name):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=getattr(optuna.samplers, sampler_name)(seed=3))
    fn = optuna_space(SearchSpace.model_validate(EXAMPLE))
    kinds = set()
    for i in range(40):
        trial = study.ask()
        fixed = fn(trial)
        assert fixed == {"distill.temperature": 2.0, "train.epochs": 1.0}
        assert not set(fixed) & set(trial.params)
        params = trial.params
        kinds.add(params["prune.kind"])
        assert ("prune.sparsity" in params) == (params["prune.kind"] != "none")
        assert ("prune.importance" in params) == (params["prune.kind"] == "heads")
        assert ("quant.group_size" in params) == (params["quant.mode"] == "int4")
        assert params["student.hidden"] in (64, 128, 192, 256)
        cfg = to_trial_config({**params, **fixed})
        assert ("sparsity" in cfg["prune"]) == (params["prune.kind"] != "none")
        study.tell(trial, [float(i % 7), float(i % 5)])
    assert kinds == {"none", "unstructured", "heads"}


# --------------------------------------------------------------------------- trial config

def test_to_trial_config_nests_and_drops_what_is_off():
    import numpy as np

    flat = {"prune.kind": "none", "prune.sparsity": 0.4, "quant.mode": "dynamic", "quant.group_size": 64,
            "lowrank.ratio": 0.0, "student.layers": np.int64(3), "train.lr": np.float64(1e-4)}
    cfg = to_trial_config(flat)
    assert cfg == {"student": {"layers": 3}, "prune": {"kind": "none"}, "quant": {"mode": "dynamic"},
                   "train": {"lr": 1e-4}}
    assert type(cfg["student"]["layers"]) is int and type(cfg["train"]["lr"]) is float
    assert to_trial_config({"prune.kind": "ffn", "prune.sparsity": 0.4, "prune.importance": "magnitude",
                            "quant.mode": "int4", "quant.group_size": 64, "lowrank.ratio": 0.5}) == \
        {"prune": {"kind": "ffn", "sparsity": 0.4, "importance": "magnitude"},
         "quant": {"mode": "int4", "group_size": 64}, "lowrank": {"ratio": 0.5}}
    assert to_trial_config({}) == {}
    assert to_trial_config({"quant.mode": "none", "quant.embedding_bits": 4}) == {"quant": {"mode": "none"}}
    with pytest.raises(ConfigError, match="unknown key.*prune.amount"):
        to_trial_config({"prune.amount": 0.3})


def test_sampled_trial_configs_are_valid_worker_configs():
    from common.trial_config import FfnPrune, HeadPrune, TrialConfig, UnstructuredPrune

    # quant is left out: common.trial_config tags it with "kind" where the trial config says "mode"
    d = {k: v for k, v in EVERY_DIMENSION.items() if k != "quant"}
    d["prune"] = {"kind": ["none", "unstructured", "heads", "ffn"], "sparsity": {"low": 0.1, "high": 0.9},
                  "importance": ["gradient", "magnitude"]}
    seen = set()
    for flat in _tune_samples(build(SearchSpace.model_validate(d)), 80):
        trial = TrialConfig.model_validate(to_trial_config(flat))  # unstructured + importance would be refused
        seen.add(type(trial.prune))
        if trial.prune is not None:
            assert math.isclose(trial.prune.sparsity, flat["prune.sparsity"])
    assert seen == {type(None), UnstructuredPrune, HeadPrune, FfnPrune}


def test_embedding_bits_reach_every_quant_mode_config():
    from common.trial_config import TrialConfig

    for mode in ("dynamic", "static", "qat", "int4", "mixed"):
        trial = TrialConfig.model_validate(to_trial_config({"quant.mode": mode, "quant.embedding_bits": 4}))
        assert trial.quant.embedding_bits == 4
    assert "search.quant.embedding_bits[1]: must be one of 4|8, got 2" in problems_of({"quant": {"embedding_bits": [4, 2]}})[0]


def test_bounds_are_the_config_models_own():
    """A value is searchable exactly when the trial config accepts it: one definition per bound."""
    from search.space import GATES
    from common.trial_config import TrialConfig

    probes = (-1, 0, 1e-9, 0.5, 0.999, 1, 1.5, 2, 4, 8, 16, 48, 64, 50, 51, 10 ** 6, 10 ** 6 + 1,
              "uniform", "top", "gradient", "magnitude", "heads", "int4", "x")
    for name, rule in DIMENSIONS.items():
        section, key = name.split(".")
        if key in ("kind", "mode"):
            continue
        tag = {}
        if name in GATES:
            parent, on = GATES[name]
            tag = {parent.split(".")[1]: sorted(on)[0]}
        for v in probes:
            if not isinstance(v, rule.type if rule.type is not float else (int, float)) or v == rule.off:
                continue
            try:
                TrialConfig.model_validate({section: {**tag, key: v}})
                accepted = True
            except ConfigError:
                accepted = False
            assert rule.ok(v) == accepted, (name, v)


def test_trial_config_puts_the_sampled_point_on_the_job_defaults():
    from common.trial_config import DistillConfig, HeadPrune, TrainConfig, TrialConfig

    base = TrialConfig(train=TrainConfig(batch_size=8, lr=1e-3), distill=DistillConfig(alpha=0.5))
    cfg = trial_config({"prune.kind": "heads", "prune.sparsity": 0.25, "train.lr": 3e-4, "lowrank.ratio": 0.0}, base)
    assert cfg.prune == HeadPrune(sparsity=0.25) and cfg.lowrank is None
    assert cfg.train == TrainConfig(batch_size=8, lr=3e-4) and cfg.distill.alpha == 0.5
    with pytest.raises(ConfigError, match="student.hidden: must be divisible"):
        trial_config({"student.hidden": 10, "student.heads": 3}, base)


def test_json_schema_reads_the_bounds_from_the_configs():
    schema = SearchSpace.model_json_schema()
    sparsity = schema["properties"]["prune"]["properties"]["sparsity"]
    assert "a number in [0, 1)" in sparsity["description"]
    assert set(schema["properties"]) == set(SECTIONS) | {"warm_start"}  # the sections, and warm_start
