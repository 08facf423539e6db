"""The elastic strategy through the orchestrator (issue 14): the spec's elastic section, the sub-model space, the
super-student stage (and its resume), the status line, and one tiny elastic job end to end on a local Ray
through Tune into the store, with lineage, saved front members, a finalist, and promotion."""
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from common.elastic_config import SubConfig, SubSpace
from common.errors import SpecError
from common.trial_config import TrialConfig
from conftest import tiny_artifact, tiny_job
from orchestrator.elastic_stage import SUPER_TRIAL, pick_finalists, sub_config, sub_space
from orchestrator.spec import parse

# the tiny teacher: 2 layers, 4 heads of 16 dims, 128 FFN neurons
SEARCH = {"student": {"layers": [1, 2], "heads": [2, 4], "ffn": [64, 128]}, "quant": {"mode": ["none", "dynamic"]},
          "vocab": {"prune": [False, True]}}


def _elastic(**over) -> dict:
    return {"name": "e", "teacher": "minilm", "strategy": "elastic", "search": SEARCH, **over}


# --------------------------------------------------------------------------- the spec

def test_an_elastic_spec_parses_and_trials_stays_the_default():
    spec = parse(_elastic(elastic={"steps": 10, "finalists": 2, "layer_choice": "top"}))
    assert spec.strategy == "elastic" and spec.elastic.steps == 10 and spec.elastic.layer_choice == "top"
    assert parse({"name": "t"}).strategy == "trials"
    assert parse(json.loads(json.dumps(spec.stored()))) == spec.model_copy(update={"ray_address": None})


@pytest.mark.parametrize("over, line", [
    ({"strategy": "hybrid"}, "strategy: must be one of trials|elastic, got 'hybrid'"),
    ({"elastic": {"steps": 0}}, "elastic.steps: must be ≥ 1, got 0"),
    ({"elastic": {"samples_per_step": 65}}, "elastic.samples_per_step: must be ≤ 64"),
    ({"elastic": {"sandwich": False, "samples_per_step": 0}}, "elastic.samples_per_step: must be ≥ 1 when"),
    ({"elastic": {"layer_choice": "middle"}}, "elastic.layer_choice: must be one of"),
    ({"elastic": {"finalists": -1}}, "elastic.finalists: must be ≥ 0"),
    ({"elastic": {"finalist_steps": 0}}, "elastic.finalist_steps: must be ≥ 1"),
    ({"elastic": {"sub_models": 3}}, "elastic.sub_models: "),
    ({"search": {**SEARCH, "student": {"layers": {"low": 1, "high": 2}}}},
     "search.student.layers: the super-student is trained for a fixed set of sizes"),
    ({"search": {**SEARCH, "student": {"layers": [1, 2], "hidden": [32, 64]}}},
     "search.student.hidden: the super-student keeps"),
    ({"search": {**SEARCH, "student": {"layers": [1, 2], "layer_choice": ["uniform", "top"]}}},
     "search.student.layer_choice: the super-student fixes which layers a depth keeps; set elastic.layer_choice"),
    ({"search": {**SEARCH, "prune": {"kind": ["none", "heads"]}}}, "search.prune: the elastic strategy narrows"),
    ({"search": {**SEARCH, "train": {"lr": [1e-4, 1e-3]}}}, "search.train: elastic sub-models are not trained"),
    ({"search": {**SEARCH, "lowrank": {"ratio": [0.0, 0.5]}}}, "search.lowrank: low rank needs training"),
    ({"search": {**SEARCH, "quant": {"mode": ["none", "qat"]}}}, "search.quant.mode: qat needs training"),
    ({"search": {"quant": {"mode": ["none", "dynamic"]}}}, "search.student: the elastic strategy needs at least"),
    ({"search": {**SEARCH, "warm_start": "auto"}}, "search.warm_start: earlier jobs' trials are not sub-models"),
    ({"objectives": ["metric:max", "latency_ms_b32:min"]}, "objectives: elastic sub-models do not report "
                                                           "latency_ms_b32"),
    ({"resources": {"workers": 2}}, "resources.workers: the elastic strategy trains its super-student on one "
                                    "worker; set 1, got 2"),
])
def test_bad_elastic_values_are_rejected_in_one_line_each(over, line):
    with pytest.raises(SpecError) as err:
        parse(_elastic(**over))
    assert len(err.value.problems) == 1, err.value.problems
    assert "\n" not in err.value.problems[0] and err.value.problems[0].startswith(line)


def test_an_elastic_section_without_the_strategy_is_an_error():
    with pytest.raises(SpecError) as err:
        parse({"name": "t", "elastic": {"steps": 5}})
    assert err.value.problems == ["elastic: only read when strategy is elastic; set strategy: elastic or drop it"]


# --------------------------------------------------------------------------- the space (pure)

def test_the_sub_space_reads_the_search_section_and_the_teacher_fills_the_rest():
    spec = parse(_elastic(search={"student": {"layers": {"low": 2, "high": 6, "step": 2}, "ffn": 96}}))
    space = sub_space(spec.search, layers=6, heads=12, ffn=3072)
    assert space == SubSpace(depths=(2, 4, 6), heads=(12,), ffn=(96,))
    assert sub_config(TrialConfig(), space) == SubConfig(depth=6, heads=12, ffn=96)  # the largest where unnamed
    cfg = TrialConfig.model_validate({"student": {"layers": 2, "heads": 4}})
    assert sub_config(cfg, space) == SubConfig(depth=2, heads=4, ffn=96)


def test_finalists_meet_the_constraints_first_then_come_nearest():
    front = [{"trial_id": "fast-bad", "metric_drop": 3.0, "size_bytes": 1, "latency_ms_b1": 1.0},
             {"trial_id": "ok-slow", "metric_drop": 0.5, "size_bytes": 3, "latency_ms_b1": 5.0},
             {"trial_id": "ok-fast", "metric_drop": 0.9, "size_bytes": 2, "latency_ms_b1": 2.0},
             {"trial_id": "near", "metric_drop": 1.5, "size_bytes": 1, "latency_ms_b1": 1.5}]
    limits = {"max_metric_drop": 1.0, "max_size_bytes": None, "max_latency_ms": None}
    assert [t["trial_id"] for t in pick_finalists(front, limits, 3)] == ["ok-fast", "ok-slow", "near"]
    assert pick_finalists(front, limits, 0) == [] and pick_finalists([], limits, 2) == []


def test_a_finalist_trains_exactly_its_steps():
    from orchestrator.elastic_stage import _finalist_config

    spec = parse(_elastic(elastic={"finalist_steps": 7}, train={"batch_size": 16, "epochs": 1}))
    cfg = _finalist_config({"student": {"layers": 1}, "train": {"batch_size": 16, "grad_accum": 2}}, spec, rows=50)
    assert cfg.student.layers == 1 and cfg.train.max_steps == 7
    batches = int(np.ceil(50 / 16))
    assert int(np.ceil(cfg.train.epochs * batches / cfg.train.grad_accum)) == 7


def test_a_static_int8_finalist_trains_as_qat_and_weight_only_modes_do_not():
    from orchestrator.elastic_stage import _finalist_config

    spec = parse(_elastic())
    static = _finalist_config({"student": {"layers": 1}, "quant": {"mode": "static", "embedding_bits": 4}}, spec,
                              rows=50)
    assert static.quant.mode == "qat" and static.quant.embedding_bits == 4
    for mode in ("dynamic", "int4"):
        cfg = _finalist_config({"student": {"layers": 1}, "quant": {"mode": mode}}, spec, rows=50)
        assert cfg.quant.mode == mode


# --------------------------------------------------------------------------- the status line

def test_the_status_line_follows_the_elastic_stages():
    from orchestrator.cli import _stage_line

    job = {"stage": "super_student", "progress": {"what": "training the super-student", "done": 3, "total": 4,
                                                   "unit": "steps"}}
    assert _stage_line(job) == "stage: super_student, training the super-student (3/4 steps, 75%)"
    job = {"stage": "search", "progress": {"done": 0, "total": 10, "unit": "sub-models", "before": 1},
           "trial_counts": {"terminated": 5, "error": 1, "running": 1}}  # one terminated row is the super-student
    assert _stage_line(job) == "stage: search (5/10 sub-models, 50%)"
    job = {"stage": "finalists", "progress": {"done": 1, "total": 2, "unit": "finalists"}}
    assert _stage_line(job) == "stage: finalists (1/2 finalists, 50%)"


def test_a_sub_models_config_reads_in_one_line():
    from orchestrator.report import describe_config

    config = {"student": {"layers": 2, "layer_choice": "uniform", "heads": 4, "ffn": 64}, "quant": {"mode": "dynamic"}}
    assert describe_config(config) == "2L uniform 4h FFN 64 · int8 dyn"


# --------------------------------------------------------------------------- the super-student stage

def test_a_killed_super_student_stage_resumes_from_its_checkpoint(tmp_path):
    """The stage's task body, run twice on one job directory as a re-run after a kill would: the second run
    continues from the checkpoint the first left in ``<out>/checkpoints``."""
    from orchestrator.elastic_stage import _train_super
    from workers.data import Encoded

    class Killed(Exception):
        pass

    class Report:  # what TeacherProgress offers the task; this one kills the task at step 2
        def __init__(self, kill_at=None):
            self.kill_at, self.steps, self.stages = kill_at, [], []

        def stage(self, what):
            self.stages.append(what)

        def step(self, step, total, loss):
            self.steps.append((step, total))
            if step == self.kill_at:
                raise Killed

    teacher = tiny_artifact(tmp_path / "teacher", layers=2).uri
    rng = np.random.default_rng(0)
    ids = rng.integers(200, 1000, (48, 12)).astype(np.int32)
    rows = Encoded(ids, np.zeros_like(ids, dtype=np.int8), np.full(48, 12), (ids[:, 1] % 2).astype(np.int64))
    bundle = {"teacher_uri": teacher, "train": rows, "logits": rng.normal(size=(48, 2)).astype(np.float32)}
    spec = parse(_elastic(teacher=teacher, search={"student": {"layers": [1, 2], "heads": [2, 4]}},
                          elastic={"epochs": 2, "steps": 4, "checkpoint_every": 2, "samples_per_step": 1,
                                   "importance_samples": 16},  # 3 batches an epoch
                          train={"batch_size": 16, "lr": 1e-3}))
    out = tmp_path / "job" / "super"
    with pytest.raises(Killed):
        _train_super(spec, bundle, str(out), {"job_id": "j"}, Report(kill_at=2))
    assert (out / "checkpoints" / "latest").is_file() and not (out / "super").exists()
    again = Report()
    res = _train_super(spec, bundle, str(out), {"job_id": "j"}, again)
    assert res["resumed_from"] == 2 and res["steps"] == 4 and again.steps == [(3, 4), (4, 4)]
    assert again.stages == ["ranking heads and neurons", "training the super-student"]
    assert res["space"] == {"depths": [1, 2], "heads": [2, 4], "ffn": [128]}
    assert (out / "super" / "model.safetensors").is_file() and res["uri"] == str((out / "super").resolve())


# --------------------------------------------------------------------------- a whole job

@pytest.mark.slow
def test_an_elastic_job_runs_end_to_end_with_lineage_and_promotes(tiny_teacher_dir, tmp_path, ray_local,
                                                                 monkeypatch):
    from db import Store
    from deploy import control
    from orchestrator.cli import app
    from orchestrator.jobs import submit
    from orchestrator.promote import promote
    from workers import artifacts

    raw = tiny_job(tiny_teacher_dir, tmp_path, strategy="elastic", search=SEARCH,
                   elastic={"steps": 4, "checkpoint_every": 2, "samples_per_step": 1, "importance_samples": 32,
                            "finalists": 1, "finalist_steps": 3},
                   budget={"num_trials": 6}, constraints={"max_metric_drop": None})
    raw["search"] = SEARCH  # tiny_job merges sections: the trials strategy's train and prune knobs must go
    job_id = submit(parse(raw))
    store = Store(raw["storage"]["db_url"])
    job = store.get_job(job_id)
    assert job["status"] == "finished" and job["stage"] == "done", job.get("error")
    trials = {t["trial_id"]: t for t in store.trials(job_id)}

    # the super-student: one row, trained for its steps, with its artifact and its checkpoint directory
    sup = trials.pop(SUPER_TRIAL)
    assert sup["status"] == "terminated" and sup["parent"] is None and sup["metric"] is None
    assert sup["result"]["train_steps"] == 4 and sup["result"]["resumed_from_step"] == 0 and sup["artifact_uri"]
    assert (tmp_path / "jobs" / job_id / "super" / "checkpoints" / "latest").is_file()

    # six sub-model trials through Tune, each the super-student's child, scored without training
    subs = [t for t in trials.values() if t["parent"] == SUPER_TRIAL]
    assert len(subs) == 6 and all(t["status"] == "terminated" for t in subs)
    for t in subs:
        assert t["config"]["student"]["layers"] in (1, 2) and t["config"]["student"]["heads"] in (2, 4)
        assert t["metric"] is not None and t["size_bytes"] > 0 and t["latency_ms_b1"] > 0
        assert t["result"]["sub_depth"] == t["config"]["student"]["layers"]
    # only the search's front was saved (a finalist may since have pushed its parent off the front, but
    # finalists never push a sub-model onto it), and what was saved is what the search counted
    assert any(t["artifact_uri"] for t in subs)
    assert all(t["artifact_uri"] for t in subs if t["on_front"])
    for t in subs:
        if not t["artifact_uri"]:
            assert "artifact_uri" not in t["result"] and "latency_ms_b32" not in t["result"]
            continue
        assert t["latency_ms_b32"] > 0 and t["result"]["dev_metric"] is not None
        model, _, meta = artifacts.load(t["artifact_uri"], with_tokenizer=False)
        assert artifacts.info(t["artifact_uri"]).size_bytes == t["size_bytes"]
        assert len(model.bert.encoder.layer) == t["config"]["student"]["layers"]
        assert model.bert.encoder.layer[0].attention.self.num_attention_heads == t["config"]["student"]["heads"]
        assert meta["parent"] == SUPER_TRIAL and meta["trial_id"] == t["trial_id"]

    # one finalist: the best front sub-model, distilled from its sliced weights for its steps
    finalists = [t for t in trials.values() if t["parent"] != SUPER_TRIAL]
    assert len(finalists) == 1
    fin = finalists[0]
    parent = trials[fin["parent"]]
    assert fin["trial_id"] == f"{parent['trial_id']}-finalist" and parent["artifact_uri"]
    assert fin["status"] == "terminated" and fin["result"]["train_steps"] == 3 and fin["artifact_uri"]
    assert fin["config"]["student"] == parent["config"]["student"]
    model, _, _ = artifacts.load(fin["artifact_uri"], with_tokenizer=False)
    assert len(model.bert.encoder.layer) == parent["config"]["student"]["layers"]

    # the front is over every trial of the job; `slimray results` shows the lineage
    assert any(t["on_front"] for t in [fin, *subs])
    monkeypatch.setenv("SLIMRAY_DB_URL", raw["storage"]["db_url"])
    out = CliRunner().invoke(app, ["results", job_id, "--format", "csv"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    parent_at = lines[0].split(",").index("parent")
    assert sum(line.split(",")[parent_at] == SUPER_TRIAL for line in lines[1:]) == 6

    # promotion picks from that front (the deploy itself is replaced; tests/test_serve.py deploys for real)
    calls = []
    monkeypatch.setattr(control, "deploy", lambda uri, **kw: calls.append(uri) or control.endpoint_url(8000, "/"))
    chosen = promote(job_id, store=store)
    front = {t["trial_id"]: t for t in store.trials(job_id) if t["on_front"]}
    assert chosen["trial_id"] in front and calls == [front[chosen["trial_id"]]["artifact_uri"]]
    assert store.deployments(job_id)[0]["trial_id"] == chosen["trial_id"]
