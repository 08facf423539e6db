"""The teacher cache: keyed on what decides the teacher, reused fast, prepared once even by two jobs at once."""
import shutil
import threading
import time

import numpy as np
import pytest

from workers import teacher as teacher_mod
from common.trial_config import TeacherTrainConfig
from workers.data import TaskConfig, load
from workers.teacher import fingerprint, prepare, resolve_model
from workers.teacher_cache import files_hash, locked

SETTINGS = TeacherTrainConfig(lr=1e-3, epochs=1, batch_size=16)


@pytest.fixture(scope="module")
def task(tiny_task_dir):
    return load(TaskConfig(dataset=str(tiny_task_dir), train_size=160, eval_size=64, max_length=32))


def _prepare(teacher_dir, task, cache, train=SETTINGS, **kw):
    return prepare(str(teacher_dir), task, train, cache, latency_runs=2, **kw)


def test_second_preparation_reuses_the_cache_quickly(tiny_teacher_dir, task, tmp_path):
    steps = []
    first = _prepare(tiny_teacher_dir, task, tmp_path, progress=lambda s, t, loss: steps.append(s))
    assert steps and first.train_logits.shape == (160, 2) and first.metrics["size_bytes"] > 0
    again_steps = []
    t0 = time.perf_counter()
    again = _prepare(tiny_teacher_dir, task, tmp_path, progress=lambda s, t, loss: again_steps.append(s))
    assert time.perf_counter() - t0 < 5
    assert not again_steps and again.uri == first.uri and again.key == first.key
    assert np.array_equal(again.train_logits, first.train_logits)
    assert again.metrics == first.metrics


def test_a_changed_setting_weight_row_or_training_code_changes_the_key(tiny_teacher_dir, task, tmp_path,
                                                                       monkeypatch):
    path = resolve_model(str(tiny_teacher_dir))

    def key(model=path, rows=task.train, train=SETTINGS):
        return fingerprint(model, rows, task, train, tmp_path)

    base = key()
    assert key() == base
    assert key(train=SETTINGS.model_copy(update={"lr": 2e-3})) != base
    assert key(train=SETTINGS.model_copy(update={"seeds": (0, 1)})) != base
    assert key(rows=load(TaskConfig(dataset=task.config.dataset, train_size=150, eval_size=64,
                                    max_length=32)).train) != base
    # the same config.json with other weights: a different teacher
    other = tmp_path / "other-weights"
    shutil.copytree(tiny_teacher_dir, other)
    weights = other / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    weights.write_bytes(bytes(raw))
    assert key(model=str(other)) != base
    monkeypatch.setattr(teacher_mod, "TRAINING_CODE", (*teacher_mod.TRAINING_CODE, "workers.evaluate"))
    assert key() != base


def test_weight_hashes_are_remembered_by_path_size_and_mtime(tiny_teacher_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_teacher_dir, model)
    first = files_hash(model, tmp_path / "memo")
    assert (tmp_path / "memo" / "file-hashes.json").is_file()
    assert files_hash(model, tmp_path / "memo") == first
    (model / "README.md").write_text("not part of the model")
    assert files_hash(model, tmp_path / "memo") == first
    cfg = model / "config.json"
    cfg.write_text(cfg.read_text().replace("64", "65", 1))
    assert files_hash(model, tmp_path / "memo") != first


def test_a_changed_setting_prepares_a_new_teacher(tiny_teacher_dir, task, tmp_path):
    first = _prepare(tiny_teacher_dir, task, tmp_path)
    steps = []
    other = _prepare(tiny_teacher_dir, task, tmp_path, train=SETTINGS.model_copy(update={"lr": 5e-4}),
                     progress=lambda s, t, loss: steps.append(s))
    assert steps and other.uri != first.uri


def test_two_concurrent_preparations_fine_tune_once(tiny_teacher_dir, task, tmp_path):
    stages, results, errors = [], [], []

    def job(name):
        try:
            results.append(_prepare(tiny_teacher_dir, task, tmp_path,
                                    on_stage=lambda what: stages.append((name, what))))
        except BaseException as err:  # surfaced below: a thread's exception would otherwise vanish
            errors.append(err)

    threads = [threading.Thread(target=job, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 2
    assert [what for _, what in stages].count("fine-tuning") == 1
    assert results[0].uri == results[1].uri
    assert np.array_equal(results[0].train_logits, results[1].train_logits)
    assert len(list(tmp_path.glob("teacher-*/slimray.json"))) == 1


def test_the_lock_makes_a_second_holder_wait(tmp_path):
    order, waited = [], threading.Event()
    held = threading.Event()

    def second():
        held.wait(10)
        with locked(tmp_path / "x.lock", on_wait=waited.set):
            order.append("second")

    t = threading.Thread(target=second)
    t.start()
    with locked(tmp_path / "x.lock"):
        held.set()
        deadline = time.time() + 10
        while not waited.is_set() and time.time() < deadline:
            time.sleep(0.01)
        order.append("first")
    t.join(10)
    assert waited.is_set() and order == ["first", "second"]


def test_the_teacher_fine_tunes_on_all_rows_and_labels_the_students_subset(tiny_teacher_dir, tmp_path):
    from conftest import tiny_job
    from orchestrator.jobs import prepare_teacher
    from orchestrator.spec import parse
    from workers import artifacts

    spec = parse(tiny_job(tiny_teacher_dir, tmp_path, task={"train_size": 100},
                          teacher_train={"epochs": 1, "batch_size": 32, "train_size": None}, latency={"runs": 2}))
    teacher, data = prepare_teacher(spec, tmp_path / "teachers")
    assert len(data.train) == 100 and teacher.train_logits.shape == (100, 2) and len(teacher.train) == 100
    # every row but the selection split's 500, which nothing trains on
    assert len(data.select) == 500 and artifacts.read_meta(teacher.uri)["train_rows"] == 2000 - 500
    limited = parse(tiny_job(tiny_teacher_dir, tmp_path, task={"train_size": 100},
                             teacher_train={"epochs": 1, "batch_size": 32, "train_size": 300}, latency={"runs": 2}))
    small, _ = prepare_teacher(limited, tmp_path / "teachers")
    assert artifacts.read_meta(small.uri)["train_rows"] == 300 and small.uri != teacher.uri


def test_several_seeds_keep_the_best_on_held_out_rows(tiny_teacher_dir, task, tmp_path):
    from workers import artifacts

    steps = []
    t = _prepare(tiny_teacher_dir, task, tmp_path, train=SETTINGS.model_copy(update={"seeds": (3, 4)}),
                 progress=lambda s, total, loss: steps.append((s, total)))
    meta = artifacts.read_meta(t.uri)
    scores = {int(s): m for s, m in meta["seed_metrics"].items()}
    assert set(scores) == {3, 4} and scores[meta["seed"]] == max(scores.values())
    # one bar over both fine-tunes, each on the 144 rows left after holding out 16
    assert steps[-1] == (2 * 9, 2 * 9) and len(steps) == 18


def test_slimray_teacher_prepare_prepares_then_reuses(tiny_teacher_dir, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from conftest import tiny_job
    from orchestrator.cli import app

    spec = tmp_path / "job.yaml"
    raw = tiny_job(tiny_teacher_dir, tmp_path, task={"train_size": 100, "augment": {"copies": 1}},
                   teacher_train={"epochs": 1, "batch_size": 32, "train_size": 200}, latency={"runs": 2})
    spec.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    first = runner.invoke(app, ["teacher", "prepare", str(spec)])
    assert first.exit_code == 0, first.output
    cached = list((tmp_path / "jobs" / "teachers").glob("teacher-*/slimray.json"))
    assert len(cached) == 1
    assert "teacher prepared: " in first.output and "accuracy" in first.output
    assert str(cached[0].parent) in first.output.replace("\n", "")
    assert "students' rows: 100 + 100 augmented" in first.output
    again = runner.invoke(app, ["teacher", "prepare", str(spec)])
    assert again.exit_code == 0 and "teacher already prepared: " in again.output
    bad = runner.invoke(app, ["teacher", "prepare", str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "not found" in bad.output
