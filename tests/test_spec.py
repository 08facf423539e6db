from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.spec import load, parse
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
    assert "hunter2" not in str(spec.to_dict())
    assert spec.storage.db_url.endswith("hunter2@db/slim")


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
