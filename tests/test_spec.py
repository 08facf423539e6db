from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import json

from orchestrator.spec import JobSpec, from_stored, load, parse
from common.errors import SpecError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["tiny.yaml", "demo-sst2.yaml", "sst2-minilm.yaml", "mrpc-minilm.yaml",
                                  "sst2-minilm-gpu.yaml"])
def test_examples_are_valid(name):
    spec = load(EXAMPLES / name)
    assert spec.objectives and spec.task.dataset.startswith("glue/")
    assert spec.budget.num_trials >= 4


def test_every_problem_reported_at_once(tmp_path):
    raw = {
        "name": "bad name!",
        "teacher": "./no/such/teacher",
        "task": {"dataset": "glue/sst2", "max_length": 0, "colour": "red"},
        "search": {"prune": {"sparsity": {"low": 0.2, "high": 1.5}}},
        "objectives": ["metric:max", "bleu:max"],
        "budget": {"num_trials": 0},
        "train": {"lr": -1, "batch_size": "big"},
        "resources": {"workers": 0},
        "surprise": 1,
    }
    with pytest.raises(SpecError) as info:
        parse(raw)
    problems = info.value.problems
    text = "\n".join(problems)
    for needle in ("name:", "teacher: local path ./no/such/teacher does not exist", "task.max_length", "task.colour",
                   "search.prune.sparsity.high", "objectives[1]: no trial reports 'bleu'", "budget.num_trials",
                   "train.lr", "train.batch_size", "resources.workers", "surprise: unknown key"):
        assert needle in text, (needle, text)
    assert len(problems) >= 11
    assert str(info.value).count("\n") == len(problems)  # one line each


def test_teacher_train_errors_name_their_section():
    with pytest.raises(SpecError, match=r"teacher_train\.lr"):
        parse({"name": "x", "teacher_train": {"lr": 5}})


def test_yaml_errors_are_spec_errors(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load(p)
    with pytest.raises(SpecError, match="not found"):
        load(tmp_path / "missing.yaml")
    p.write_text("- a list\n")
    with pytest.raises(SpecError, match="mapping"):
        load(p)


def test_secrets_are_masked_in_stored_spec():
    spec = parse({"name": "x", "storage": {"db_url": "postgresql+psycopg://u:hunter2@db/slim"}})
    assert "hunter2" not in json.dumps(spec.stored())
    assert spec.storage.db_url.endswith("hunter2@db/slim")


@pytest.mark.parametrize("name", ["tiny.yaml", "demo-sst2.yaml", "mrpc-minilm.yaml"])
def test_specs_round_trip_through_json(name):
    spec = load(EXAMPLES / name)
    text = json.dumps(spec.model_dump(mode="json"))
    assert JobSpec.model_validate(json.loads(text)) == spec
    assert JobSpec.model_validate_json(text) == spec
    assert from_stored(json.loads(json.dumps(spec.stored()))) == spec


def test_spec_stored_by_an_earlier_version_loads(tmp_path):
    old = {"name": "old", "teacher": str(tmp_path / "gone"),  # its teacher directory was deleted since
           "task": {"dataset": "glue/sst2", "max_length": 64},
           "search": {"prune": {"kind": ["none", "heads"], "sparsity": 0.5}},
           "algorithm": {"name": "tpe", "asha": True, "max_t": 8},
           "objectives": ["metric:max", "size_bytes:min"],
           "constraints": {"max_metric_drop": 2.0}, "teacher_train": {"lr": 5e-5, "epochs": 2}}
    spec = from_stored(old)
    assert spec.algorithm.asha == "metric" and spec.algorithm.max_t == 8 and spec.seq_len == 64
    assert spec.constraints.max_metric_drop == 2.0 and spec.teacher_train.epochs == 2
    assert from_stored({**old, "algorithm": {"algorithm": "random", "asha": False}}).algorithm.asha == "none"
    with pytest.raises(SpecError, match="teacher: local path"):
        parse(old)  # a new submission still needs its teacher


def test_scheduler_defaults_to_mo_asha_with_several_objectives():
    assert parse({"name": "x"}).algorithm.asha == "mo"
    assert parse({"name": "x", "objectives": ["metric:max", "params:min"]}).algorithm.asha == "mo"
    with pytest.raises(SpecError, match=r"objectives: must have at least 2 item\(s\)"):
        parse({"name": "x", "objectives": ["metric:max"]})  # a Pareto front needs two
    assert parse({"name": "x", "algorithm": {"asha": "none"}}).algorithm.asha == "none"
    with pytest.raises(SpecError, match="algorithm.asha_mode: min contradicts objective metric:max"):
        parse({"name": "x", "algorithm": {"asha": "metric", "asha_mode": "min"}})


def test_unknown_keys_are_errors_at_every_level():
    with pytest.raises(SpecError) as info:
        parse({"name": "x", "colour": 1, "train": {"speed": 2}, "algorithm": {"bogus": 3},
               "search": {"prune": {"amount": 0.5}}, "constraints": {"max_size": 4}})
    lines = info.value.problems
    for start in ("colour: unknown key", "train.speed: unknown key", "algorithm.bogus: unknown key",
                  "search.prune.amount: unknown key", "constraints.max_size: unknown key"):
        assert any(p.startswith(start) for p in lines), (start, lines)
    assert len(lines) == 5


def test_teacher_train_has_its_own_defaults():
    spec = parse({"name": "x", "teacher_train": {"train_size": 500, "seeds": [0, 1, 2]}})
    assert spec.teacher_train.lr == 5e-5 and spec.teacher_train.train_size == 500
    assert spec.teacher_train.seeds == (0, 1, 2) and spec.train.group_by_length is True


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10 ** 6), st.floats(allow_nan=True),
                     st.text(max_size=8))
_junk = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=3),
                                                      st.dictionaries(st.text(max_size=6), kids, max_size=3)),
                     max_leaves=8)
_sections = st.sampled_from(["name", "teacher", "task", "search", "algorithm", "objectives", "constraints", "budget",
                             "resources", "train", "distill", "teacher_train", "latency", "storage", "ray_address",
                             "other"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_sections, _junk, max_size=6))
def test_malformed_specs_raise_only_spec_errors(raw):
    try:
        parse(raw)
    except SpecError as err:
        assert err.problems and all(isinstance(p, str) and "\n" not in p for p in err.problems)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_random_yaml_text(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("y") / "spec.yaml"
    p.write_text(text)
    try:
        load(p)
    except SpecError:
        pass


def test_configuration_reference_is_generated_from_the_schema():
    from orchestrator.schema_doc import render

    committed = (EXAMPLES.parent / "docs" / "configuration.md").read_text()
    assert committed == render(), "docs/configuration.md is stale: run `make docs`"
    assert "| `train.lr` | peak learning rate: a number in (0, 1) |" in committed  # search bounds from the configs


def test_cli_prints_the_schema_and_checks_a_spec():
    from typer.testing import CliRunner

    from orchestrator.cli import app

    out = CliRunner().invoke(app, ["spec", "schema"])
    assert out.exit_code == 0, out.output
    schema = json.loads(out.output)
    assert schema["required"] == ["name"] and "teacher_train" in schema["properties"]
    out = CliRunner().invoke(app, ["spec", "check", str(EXAMPLES / "tiny.yaml")])
    assert out.exit_code == 0 and "valid job spec 'sst2-tiny'" in out.output


def _section_models():
    from orchestrator.spec import Budget, Constraints, LatencySettings, Resources, Storage
    from search.algorithms import SearchSettings
    from search.space import SearchSpace

    return [Constraints(max_metric_drop=None, max_size_mb=20, max_latency_ms=2.5),
            Budget(num_trials=3, max_concurrent=2, time_budget_s=60, max_failures=0),
            Resources(cpus=0.5, gpus=1, workers=2), LatencySettings(threads=2, runs=5, seq_len=16),
            Storage(db_url="sqlite:///x.db", artifact_dir="/tmp/a"),
            SearchSettings(name="random", asha="none", seed=None),
            SearchSpace.model_validate({"student": {"layers": [1, 2]}, "train": {"lr": {"low": 1e-4, "high": 1e-3}}})]


@pytest.mark.parametrize("cfg", _section_models(), ids=lambda c: type(c).__name__)
def test_every_spec_section_round_trips_through_json(cfg):
    assert type(cfg).model_validate(json.loads(json.dumps(cfg.model_dump(mode="json")))) == cfg
    assert type(cfg).model_validate_json(cfg.model_dump_json()) == cfg


def test_where_a_run_connects_is_not_stored():
    spec = parse({"name": "x", "ray_address": "ray://head:10001"})
    assert "ray_address" not in spec.stored()
    assert spec.stored() == spec.model_copy(update={"ray_address": None}).stored()


def test_augmentation_without_the_teacher_is_one_line():
    raw = {"name": "aug", "task": {"dataset": "glue/sst2", "augment": {"copies": 4}}, "distill": {"alpha": 0.0}}
    with pytest.raises(SpecError) as err:
        parse(raw)
    assert err.value.problems == [next(p for p in err.value.problems if p.startswith("task.augment.copies"))]
    assert "distill.alpha" in str(err.value) and "\n" not in str(err.value)
    parse({**raw, "distill": {"alpha": 0.5}})  # the teacher's logits label the augmented rows
    parse({**raw, "search": {"distill": {"alpha": {"low": 0.0, "high": 1.0}}}})  # a searched alpha may be > 0
