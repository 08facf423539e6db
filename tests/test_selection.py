"""Choose on one split, report on another (issue 14, item 0): the search scores on a selection split carved from
the training data, which neither the teacher nor a student trains on; promotion and the reports use dev."""
from __future__ import annotations

import random

import numpy as np
import pytest

from conftest import promotion_store, tiny_artifact
from common.errors import ConfigError, DataError, SpecError
from workers.data import Encoded, SelectionConfig, TaskConfig, load


def _task(tmp_path, rows: int = 2000):
    """A task whose every training text is unique (``row <i>``), so rows can be told apart by their text."""
    d = tmp_path / "task"
    d.mkdir(parents=True, exist_ok=True)
    words = ("good", "bad")
    (d / "train.tsv").write_text("text\tlabel\n" + "".join(f"a {words[i % 2]} film row{i}\t{i % 2}\n"
                                                          for i in range(rows)))
    (d / "validation.tsv").write_text("text\tlabel\n" + "".join(f"a {words[i % 2]} story\t{i % 2}\n"
                                                               for i in range(40)))
    return d


def test_selection_rows_are_never_training_rows_and_stay_put(tmp_path):
    d = str(_task(tmp_path))
    students = load(TaskConfig(dataset=d, train_size=200, seed=3))
    teacher = load(TaskConfig(dataset=d, seed=3))  # the teacher's rows: all the selection split leaves
    held = set(students.select.texts)
    assert len(held) == 500  # 10% of 2,000 is 200: the 500-row floor wins
    assert not held & set(students.train.texts) and not held & set(teacher.train.texts)
    assert len(teacher.train) == 1500 and set(students.train.texts) <= set(teacher.train.texts)
    assert teacher.select.texts == students.select.texts  # the same rows whatever train_size says
    again, other = load(TaskConfig(dataset=d, train_size=200, seed=3)), load(TaskConfig(dataset=d, train_size=200,
                                                                                         seed=4))
    assert again.select.texts == students.select.texts and again.train.texts == students.train.texts
    assert set(other.select.texts) != held
    assert [int(t.rsplit("row", 1)[1]) % 2 for t in students.select.texts] == list(students.select.labels)


def test_share_zero_is_the_old_split(tmp_path):
    d = str(_task(tmp_path))
    data = load(TaskConfig(dataset=d, train_size=200, seed=3, selection={"share": 0}))
    assert data.select is None
    picked = sorted(random.Random(3).sample(range(2000), 200))  # the subset drawn before task.selection existed
    assert data.train.texts == [f"a {('good', 'bad')[i % 2]} film row{i}" for i in picked]


def test_rows_share_floor_and_half_cap():
    rule = SelectionConfig()
    assert (rule.rows(67_349), rule.rows(2000), rule.rows(600), rule.rows(2)) == (6735, 500, 300, 1)
    assert SelectionConfig(share=0).rows(10_000) == 0
    assert SelectionConfig(share=0.2, min_rows=10).rows(1000) == 200


def test_bad_selection_values_get_one_line_each(tmp_path):
    from orchestrator.spec import parse

    with pytest.raises(ConfigError) as err:
        TaskConfig(selection={"share": 0.7, "min_rows": 0, "size": 3})
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 3 and all(line.strip().startswith("task.selection.") for line in lines)
    assert any("task.selection.share" in line and "0.5" in line for line in lines)
    with pytest.raises(SpecError, match=r"task\.selection\.share") as err:
        parse({"name": "x", "task": {"selection": {"share": "10%"}}})
    with pytest.raises(DataError, match=r"task\.selection.*share: 0") as err:
        load(TaskConfig(dataset=str(_task(tmp_path / "one", rows=1)), labels=("0", "1")))
    assert "\n" not in str(err.value)


def test_a_spec_stored_before_the_split_existed_loads_without_it():
    from orchestrator.spec import from_stored, parse

    old = from_stored({"name": "x", "task": {"max_length": 32}})
    assert old.task.selection.share == 0
    new = parse({"name": "x"})
    assert new.task.selection.share == 0.1
    assert from_stored({"name": "x", "task": new.task.model_dump(mode="json")}).task.selection == new.task.selection


def test_job_teacher_never_sees_the_selection_split_and_its_key_changes(tmp_path, tiny_teacher_dir, monkeypatch):
    from conftest import tiny_job
    from orchestrator import jobs
    from orchestrator.spec import parse
    from workers import teacher as teacher_mod

    seen = {}

    def fake_prepare(model, data, train, cache_dir, *, teacher_rows=None, **kw):
        seen.update(data=data, rows=teacher_rows)
        return "teacher"

    monkeypatch.setattr(teacher_mod, "prepare", fake_prepare)
    spec = parse(tiny_job(tiny_teacher_dir, tmp_path, teacher_train={"train_size": None}))
    jobs.prepare_teacher(spec, tmp_path / "cache")
    data, rows = seen["data"], seen["rows"]
    held = set(data.select.texts)
    assert len(held) == 500 and len(rows) == 1500 and not held & set(rows.texts) and not held & set(data.train.texts)

    off = spec.model_copy(update={"task": spec.task.model_copy(update={"selection": SelectionConfig(share=0)})})
    jobs.prepare_teacher(off, tmp_path / "cache")
    assert seen["data"].select is None and len(seen["rows"]) == 2000
    train = spec.teacher_train
    key_on = teacher_mod.fingerprint(str(tiny_teacher_dir), rows, data, train, tmp_path)
    key_off = teacher_mod.fingerprint(str(tiny_teacher_dir), seen["rows"], seen["data"], train, tmp_path)
    assert key_on != key_off


@pytest.fixture(scope="module")
def prepared(tiny_teacher_dir, tiny_task_dir, tmp_path_factory):
    from common.trial_config import TrainConfig
    from workers.teacher import prepare

    data = load(TaskConfig(dataset=str(tiny_task_dir), train_size=128, eval_size=64, max_length=32,
                           selection={"share": 0.1, "min_rows": 100}))
    return prepare(str(tiny_teacher_dir), data, TrainConfig(lr=1e-3, epochs=1, batch_size=16),
                   tmp_path_factory.mktemp("teachers"))


def test_teacher_is_scored_on_both_splits(prepared):
    from workers import artifacts
    from workers.evaluate import predict_logits, task_metrics

    t = prepared
    assert len(t.select) == 200 and len(t.train) == 128
    net, _, meta = artifacts.load(t.uri)
    assert t.metrics["dev_metric"] == meta["metrics"]["metric"] == t.metrics["dev_accuracy"]
    assert t.metrics["metric"] == pytest.approx(task_metrics(predict_logits(net, t.select), t.select.labels,
                                                             "accuracy")["metric"])


def test_trial_chooses_on_selection_and_reports_dev(prepared, tmp_path):
    from common.trial_config import TrialConfig
    from workers import artifacts
    from workers.evaluate import predict_logits, task_metrics
    from workers.trial import TrialContext, run

    t = prepared
    # labels no model predicts: accuracy 0 exactly, so a number scored on the dev split by mistake shows
    impossible = Encoded(t.select.input_ids, t.select.token_type_ids, t.select.lengths,
                         np.full(len(t.select), 2, dtype=np.int64), texts=t.select.texts,
                         max_length=t.select.max_length)
    reports = []
    ctx = TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                       teacher_logits=t.train_logits, metric="accuracy", out_dir=str(tmp_path / "trial"), seq_len=16,
                       latency_runs=3, report=lambda m, c: reports.append(m), select=impossible)
    result = run(TrialConfig.model_validate({"student": {"layers": 1}, "vocab": {"prune": True},
                                             "train": {"max_steps": 4, "batch_size": 16, "eval_every": 2}}), ctx)
    assert [r["metric"] for r in reports] == [0.0]
    assert result["metric"] == result["accuracy"] == 0.0 and result["metric_drop"] == t.metrics["metric"]
    model, tok, _ = artifacts.load(result["artifact_uri"])
    from workers.vocab import retokenise

    dev = task_metrics(predict_logits(model, retokenise(t.eval, tok)), t.eval.labels, "accuracy")
    assert result["dev_metric"] == result["dev_accuracy"] == pytest.approx(dev["accuracy"]) and dev["accuracy"] > 0
    assert result["dev_metric_drop"] == pytest.approx(t.metrics["dev_metric"] - dev["accuracy"])

    plain = run(TrialConfig.model_validate({"student": {"layers": 1}, "train": {"max_steps": 2, "batch_size": 16}}),
                TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                             teacher_logits=t.train_logits, metric="accuracy", out_dir=str(tmp_path / "plain"),
                             seq_len=16, latency_runs=3))
    assert plain["metric"] == plain["dev_metric"]  # no selection split: both are the dev split's


JOB = "job-select"
SPEC = {"name": "tiny", "task": {"max_length": 32, "selection": {"share": 0.1}}, "latency": {"seq_len": 16},
        "objectives": ["metric:max", "size_bytes:min", "latency_ms_b1:min"]}
# the search's numbers (selection split) and the dev split's: t_fast looks best on selection, fails on dev
BASELINE = {"metric": 92.0, "dev_metric": 90.0, "size_bytes": 10_000_000, "latency_ms_b1": 5.0, "uri": "/nowhere"}
RESULTS = {"t_fast": (91.5, 88.0, 1_000_000), "t_mid": (90.5, 89.5, 5_000_000), "t_slow": (91.9, 89.9, 3_000_000)}


@pytest.fixture
def chosen_on_selection(tmp_path_factory, tmp_path):
    root = tmp_path_factory.mktemp("select-artifacts")
    uris = {"t_fast": tiny_artifact(root / "fast", layers=1, hidden=32, heads=2, ffn=64).uri,
            "t_mid": tiny_artifact(root / "mid", layers=2, hidden=128, heads=4, ffn=512).uri,
            "t_slow": tiny_artifact(root / "slow", layers=4, hidden=256, heads=4, ffn=1024).uri}
    store = promotion_store(f"sqlite:///{tmp_path}/s.db", JOB,
                            [{"trial_id": tid, "artifact_uri": uris[tid]} for tid in RESULTS], spec=SPEC,
                            baseline=BASELINE)
    for tid, (sel, dev, size) in RESULTS.items():
        store.trial_finished(JOB, tid, "terminated", {
            "metric": sel, "metric_drop": 92.0 - sel, "accuracy": sel, "dev_metric": dev, "dev_accuracy": dev,
            "dev_metric_drop": 90.0 - dev, "size_bytes": size, "latency_ms_b1": 1.0, "artifact_uri": uris[tid]})
    yield store
    store.close()


def test_promotion_holds_the_limit_against_dev(chosen_on_selection, monkeypatch):
    from deploy import control
    from orchestrator.promote import promote

    calls = []
    monkeypatch.setattr(control, "deploy", lambda uri, **kw: calls.append(kw["info"]))
    out = promote(JOB, store=chosen_on_selection)
    # on the selection split t_fast is within 1 point (0.5) and the fastest; on dev it is 2 points down
    assert out["trial_id"] == "t_mid" and out["metric"] == 89.5 and out["metric_drop"] == pytest.approx(0.5)
    assert calls[0]["selection_metric"] == 90.5 and calls[0]["teacher"]["metric"] == 90.0
    assert {r["trial_id"]: r["metric_drop"] for r in out["front"]}["t_fast"] == pytest.approx(2.0)


def test_report_shows_dev_and_selection(chosen_on_selection):
    from orchestrator.report import front_summary, markdown
    from search.pareto import hypervolume

    md = markdown(chosen_on_selection, JOB)
    mid = next(line for line in md.splitlines() if line.startswith("| t_mid")).split(" | ")
    assert mid[2:5] == ["89.50", "0.50", "90.50"]  # dev metric, dev drop, selection metric
    assert "teacher 90.00" in md and "teacher 92.00" in md
    points = [[dev, size / 1e7, 1.0 / 5.0] for _, dev, size in RESULTS.values()]
    expected = hypervolume(points, ["max", "min", "min"], [80.0, 1.0, 1.0])
    assert front_summary(chosen_on_selection, JOB)["hypervolume"] == pytest.approx(expected)
