"""The Store against every backend we have: SQLite always, PostgreSQL when
``SLIMRAY_TEST_PG_URL`` names a scratch database (its tables are dropped)."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa

from db import Store, StoreError, default_url, display_url
from db.migrate import schema_diffs
from db.models import Base

BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("SLIMRAY_TEST_PG_URL") else [])

SPEC = {"name": "sst2-tiny", "search": {"student.layers": [2, 4]}, "budget": {"num_trials": 4}}
CONFIG = {"student": {"layers": 2, "hidden": 64}, "quant": {"bits": 8, "mode": "qat"}}
RESULT = {"metric": 0.91, "metric_drop": 0.02, "size_bytes": 5_000_000_000, "params": 1_200_000,
          "latency_ms_b1": 3.5, "latency_ms_b32": 20.0, "train_seconds": 12.5, "sparsity": 0.5, "bits": 8,
          "artifact_uri": "file:///runs/t1"}


def _wipe(url):
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
        connection.execute(sa.text("DROP TABLE IF EXISTS alembic_version"))
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'slimray.db'}"
    else:
        url = os.environ["SLIMRAY_TEST_PG_URL"]
        _wipe(url)
    s = Store(url)
    yield s
    s.close()
    if request.param == "postgresql":
        _wipe(url)


def _job(store, job_id="sst2-tiny-1a2b3c"):
    return store.create_job(job_id, "sst2-tiny", SPEC, teacher="bert-base", dataset="glue/sst2", code_version="abc")


def test_create_get_and_list_jobs(store):
    created = _job(store, "a-1")
    assert created["status"] == "pending" and created["spec"] == SPEC and created["trial_counts"] == {}
    assert _job(store, "a-1") == created  # idempotent
    _job(store, "b-2")
    store.trial_started("b-2", "t1", CONFIG)
    store.trial_started("b-2", "t2", CONFIG)
    store.trial_finished("b-2", "t2", "terminated", RESULT)

    jobs = store.list_jobs()
    assert [j["id"] for j in jobs] == ["b-2", "a-1"]  # newest first
    assert jobs[0]["trial_counts"] == {"running": 1, "terminated": 1}
    assert store.list_jobs(limit=1)[0]["id"] == "b-2"

    got = store.get_job("a-1")
    assert got["teacher"] == "bert-base" and got["dataset"] == "glue/sst2" and got["code_version"] == "abc"
    assert got["created_at"].endswith("+00:00")


def test_job_status_baseline_and_tune_path(store):
    _job(store)
    store.set_job_status("sst2-tiny-1a2b3c", "running")
    started = store.get_job("sst2-tiny-1a2b3c")["started_at"]
    store.set_job_baseline("sst2-tiny-1a2b3c", {"metric": 0.93})
    store.set_job_tune_path("sst2-tiny-1a2b3c", "/runs/sst2")
    store.set_job_status("sst2-tiny-1a2b3c", "failed", error="teacher OOM")
    job = store.get_job("sst2-tiny-1a2b3c")
    assert (job["status"], job["error"], job["baseline"], job["tune_path"]) == \
           ("failed", "teacher OOM", {"metric": 0.93}, "/runs/sst2")
    assert job["started_at"] == started and job["finished_at"] is not None
    store.set_job_status("sst2-tiny-1a2b3c", "failed", error="teacher OOM")
    assert store.get_job("sst2-tiny-1a2b3c") == job  # idempotent, finished_at included
    store.set_job_status("sst2-tiny-1a2b3c", "running")  # resumed
    job = store.get_job("sst2-tiny-1a2b3c")
    assert job["finished_at"] is None and job["error"] is None and job["started_at"] == started


def test_job_stage_and_progress(store):
    _job(store)
    assert store.get_job("sst2-tiny-1a2b3c")["stage"] is None
    store.set_job_stage("sst2-tiny-1a2b3c", "teacher", {"done": 120, "total": 500, "unit": "steps"})
    job = store.get_job("sst2-tiny-1a2b3c")
    assert job["stage"] == "teacher" and job["progress"] == {"done": 120, "total": 500, "unit": "steps"}
    store.set_job_stage("sst2-tiny-1a2b3c", "search")
    assert store.get_job("sst2-tiny-1a2b3c")["progress"] is None
    with pytest.raises(StoreError, match="job stage"):
        store.set_job_stage("sst2-tiny-1a2b3c", "lunch")


def test_trial_start_reports_finish(store):
    _job(store)
    assert store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG) == 1
    for step in range(3):
        store.trial_reported("sst2-tiny-1a2b3c", "t1", step, {"loss": 1.0 / (step + 1)})
    store.trial_finished("sst2-tiny-1a2b3c", "t1", "terminated", RESULT)
    store.add_artifact("sst2-tiny-1a2b3c", "t1", "file:///runs/t1", 5_000_000_000, "ab" * 32)
    store.add_artifact("sst2-tiny-1a2b3c", "t1", "file:///runs/t1", 5_000_000_000, "ab" * 32)  # upsert

    [trial] = store.trials("sst2-tiny-1a2b3c")
    assert trial["status"] == "terminated" and trial["config"] == CONFIG and trial["attempts"] == 1
    assert trial["result"] == RESULT
    assert (trial["metric"], trial["size_bytes"], trial["latency_ms_b32"]) == (0.91, 5_000_000_000, 20.0)
    assert (trial["artifact_uri"], trial["artifact_bytes"]) == ("file:///runs/t1", 5_000_000_000)
    assert trial["finished_at"] is not None and trial["on_front"] is False
    history = store.metric_history("sst2-tiny-1a2b3c", "t1")
    assert [(h["step"], h["attempt"], h["values"]["loss"]) for h in history] == \
           [(0, 1, 1.0), (1, 1, 0.5), (2, 1, 1 / 3)]
    assert store.trials("sst2-tiny-1a2b3c", status="error") == []


def test_retried_trial_is_one_row(store):
    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    store.trial_reported("sst2-tiny-1a2b3c", "t1", 0, {"loss": 2.0})
    store.trial_failed("sst2-tiny-1a2b3c", "t1", "CUDA error: out of memory", "Traceback ...")
    assert store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG) == 2
    store.trial_reported("sst2-tiny-1a2b3c", "t1", 0, {"loss": 1.5})

    [trial] = store.trials("sst2-tiny-1a2b3c")
    assert trial["attempts"] == 2 and trial["status"] == "running" and trial["finished_at"] is None
    history = store.metric_history("sst2-tiny-1a2b3c", "t1")
    assert [(h["attempt"], h["values"]["loss"]) for h in history] == [(1, 2.0), (2, 1.5)]


def test_repeated_report_is_not_duplicated(store):
    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    store.trial_reported("sst2-tiny-1a2b3c", "t1", 5, {"loss": 1.0})
    store.trial_reported("sst2-tiny-1a2b3c", "t1", 5, {"loss": 1.0})
    store.trial_reported("sst2-tiny-1a2b3c", "t1", 5, {"loss": 0.9}, attempt=1)
    assert [(h["step"], h["values"]) for h in store.metric_history("sst2-tiny-1a2b3c", "t1")] == [(5, {"loss": 0.9})]


def test_failed_trial_keeps_error_and_traceback(store):
    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    traceback = 'Traceback (most recent call last):\n  File "trial.py", line 3\nRuntimeError: boom'
    store.trial_failed("sst2-tiny-1a2b3c", "t1", "RuntimeError: boom\nmore detail", traceback)
    [trial] = store.trials("sst2-tiny-1a2b3c", status="error")
    assert (trial["error"], trial["traceback"]) == ("RuntimeError: boom", traceback)
    assert trial["finished_at"] is not None


def test_result_with_nan_and_numpy_like_scalars_is_stored(store):
    class Scalar:  # stands in for numpy.float32 without importing numpy
        def item(self):
            return 0.5

    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    store.trial_finished("sst2-tiny-1a2b3c", "t1", "stopped_early", {"metric": float("nan"), "sparsity": Scalar()})
    [trial] = store.trials("sst2-tiny-1a2b3c")
    assert trial["metric"] is None and trial["result"] == {"metric": None, "sparsity": 0.5}


def test_front_flags(store):
    _job(store)
    for t in ("t1", "t2", "t3"):
        store.trial_started("sst2-tiny-1a2b3c", t, CONFIG)
    store.set_front("sst2-tiny-1a2b3c", ["t1", "t2"])
    store.set_front("sst2-tiny-1a2b3c", ["t2", "t3"])
    store.set_remeasured_latency("sst2-tiny-1a2b3c", "t3", 2.25)
    flags = {t["trial_id"]: (t["on_front"], t["remeasured_latency_ms_b1"]) for t in store.trials("sst2-tiny-1a2b3c")}
    assert flags == {"t1": (False, None), "t2": (True, None), "t3": (True, 2.25)}
    with pytest.raises(StoreError, match="no trial 'nope'"):
        store.set_front("sst2-tiny-1a2b3c", ["t1", "nope"])


def test_deployments_replace_each_other(store):
    _job(store)
    for t in ("t1", "t2"):
        store.trial_started("sst2-tiny-1a2b3c", t, CONFIG)
    store.add_artifact("sst2-tiny-1a2b3c", "t2", "file:///runs/t2", 10, "cd" * 32)
    assert store.live_deployment() is None

    first = store.record_deployment("sst2-tiny-1a2b3c", "t1", "http://serve:8000/v1/predict", "ann")
    assert store.record_deployment("sst2-tiny-1a2b3c", "t1", "http://serve:8000/v1/predict", "ann") == first
    second = store.record_deployment("sst2-tiny-1a2b3c", "t2", "http://serve:8000/v1/predict", "bob")
    live = store.live_deployment()
    assert (live["id"], live["trial_id"], live["who"], live["artifact_uri"]) == (second, "t2", "bob", "file:///runs/t2")
    deps = store.deployments("sst2-tiny-1a2b3c")
    assert [(d["id"], d["status"]) for d in deps] == [(second, "live"), (first, "replaced")]
    assert deps[1]["ended_at"] is not None and deps[0]["ended_at"] is None

    store.set_deployment_status(first, "live")  # roll back: the other stops being live
    assert [d["status"] for d in store.deployments()] == ["replaced", "live"]
    store.set_deployment_status(first, "stopped")
    assert store.live_deployment() is None
    with pytest.raises(StoreError, match="no deployment 999"):
        store.set_deployment_status(999, "stopped")


def test_unknown_names_give_helpful_errors(store):
    with pytest.raises(StoreError, match=r"no job 'ghost'; see `slimray jobs`"):
        store.get_job("ghost")
    with pytest.raises(StoreError, match="no job 'ghost'"):
        store.trial_started("ghost", "t1", CONFIG)
    _job(store)
    with pytest.raises(StoreError, match="no trial 't9' in job 'sst2-tiny-1a2b3c'"):
        store.trial_reported("sst2-tiny-1a2b3c", "t9", 0, {})
    with pytest.raises(StoreError, match="unknown job status 'done'; use one of: pending, running"):
        store.set_job_status("sst2-tiny-1a2b3c", "done")
    with pytest.raises(StoreError, match="already exists with a different spec"):
        store.create_job("sst2-tiny-1a2b3c", "x", {"other": 1}, teacher="t", dataset="d")


def test_migration_is_idempotent_and_matches_models(store):
    _job(store)
    again = Store(store.engine.url)  # a second open runs `upgrade head` again
    assert again.get_job("sst2-tiny-1a2b3c")["name"] == "sst2-tiny"
    again.close()
    assert schema_diffs(store.engine) == []


def test_schema_check_sees_drift(tmp_path):
    # Guards the test above against passing vacuously.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'drift.db'}")
    with engine.begin() as connection:
        connection.execute(sa.text("CREATE TABLE jobs (id VARCHAR(128) PRIMARY KEY)"))
    assert schema_diffs(engine)


def test_readers_while_a_writer_reports(store):
    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    errors, done = [], threading.Event()

    def write():
        try:
            for step in range(200):
                store.trial_reported("sst2-tiny-1a2b3c", "t1", step, {"loss": 1.0 / (step + 1)})
        except Exception as err:  # noqa: BLE001 - collected and asserted on below
            errors.append(err)
        finally:
            done.set()

    def read():
        try:
            while not done.is_set():
                store.metric_history("sst2-tiny-1a2b3c", "t1")
                store.trials("sst2-tiny-1a2b3c")
                store.list_jobs()
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert [h["step"] for h in store.metric_history("sst2-tiny-1a2b3c", "t1")] == list(range(200))


def test_transient_error_is_retried(store, monkeypatch):
    _job(store)
    store.trial_started("sst2-tiny-1a2b3c", "t1", CONFIG)
    monkeypatch.setattr("db.transaction.RETRY_DELAYS_S", (0.0, 0.0))
    failures = iter([True, True])

    def locked(conn, cursor, statement, *_):
        if statement.lstrip().upper().startswith("INSERT") and next(failures, False):
            raise sa.exc.OperationalError(statement, {}, Exception("database is locked"))

    sa.event.listen(store.engine, "before_cursor_execute", locked)
    try:
        store.trial_reported("sst2-tiny-1a2b3c", "t1", 0, {"loss": 1.0})
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", locked)
    assert next(failures, None) is None  # both injected failures were hit
    assert len(store.metric_history("sst2-tiny-1a2b3c", "t1")) == 1


def test_password_is_masked():
    assert display_url("postgresql+psycopg://u:s3cret@h/db") == "postgresql+psycopg://u:***@h/db"
    assert display_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    with pytest.raises(StoreError) as err:
        Store("nosuchdialect://u:s3cret@h/db")
    assert "s3cret" not in str(err.value) and "u:***@h" in str(err.value)


def test_default_url(monkeypatch, tmp_path):
    monkeypatch.delenv("SLIMRAY_DB_URL", raising=False)
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / 'slimray.db'}"
    Store().close()  # creates the directory
    assert (tmp_path / "home" / "slimray.db").exists()
    monkeypatch.setenv("SLIMRAY_DB_URL", "postgresql+psycopg://u:p@h/db")
    assert default_url() == "postgresql+psycopg://u:p@h/db"


def test_import_is_cheap():
    code = "import sys, db; print(sorted({'ray', 'torch', 'alembic'} & set(sys.modules)))"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root).stdout
    assert out.strip() == "[]"


def test_teacher_progress_reaches_the_job_row(store):
    from orchestrator.jobs import TeacherProgress

    _job(store)
    report = TeacherProgress(store.url, "sst2-tiny-1a2b3c", every_s=3600)
    report.stage("fine-tuning")
    report.step(1, 10, 0.7)  # throttled: the row still says what it is doing
    assert store.get_job("sst2-tiny-1a2b3c")["progress"] == {"what": "fine-tuning"}
    report.step(10, 10, 0.2)  # the last step is always written
    job = store.get_job("sst2-tiny-1a2b3c")
    assert job["stage"] == "teacher"
    assert job["progress"] == {"what": "fine-tuning", "done": 10, "total": 10, "unit": "steps"}
