"""The recorder never holds up Tune's loop, never loses or reorders a write when the store is slow or briefly
unreachable, and fails loudly when it stays so."""
import os
import pickle
import sqlite3
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest
from conftest import record_fault

from db import Store
from orchestrator.recorder import Recorder
from common.errors import StoreError

CONFIG = {"student.layers": 2}


def _trial(tid, last_result=None):
    return SimpleNamespace(trial_id=tid, config=CONFIG, last_result=last_result or {}, error_file=None)


class FakeStore:
    """Keeps each transaction's writes; refuses them while ``down``, holds them while ``gate`` is closed."""

    def __init__(self):
        self.batches, self.down = [], False
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def write_batch(self, writes):
        self.entered.set()
        if not self.gate.wait(60):
            raise AssertionError("the test never opened the gate")
        if self.down:
            raise StoreError("store fake is unavailable: connection refused")
        if any(args[1] == "refused" for _, args in writes):
            raise StoreError("store fake refused a write: no trial 'refused'")
        self.batches.append(list(writes))

    def close(self):
        pass

    @property
    def writes(self):
        return [w for batch in self.batches for w in batch]


@pytest.fixture
def fake(monkeypatch):
    store = FakeStore()
    monkeypatch.setattr("db.Store", lambda url: store)  # what the recorder's writer opens
    return store


def _job(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).create_job("j", "j", {}, teacher="t", dataset="d")
    return url


def test_a_callback_returns_while_the_store_write_is_blocked(fake):
    fake.gate.clear()
    rec = Recorder("sqlite:///unused.db", "j", {})
    rec.on_trial_start(0, [], _trial("t1"))
    assert fake.entered.wait(30)  # the writer has the start in hand, stuck in the store
    for step in (1, 2, 3):
        rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 60.0 + step})
    # reached with the gate still closed: no callback waited for the store
    assert fake.batches == [] and rec.pending == 4
    fake.gate.set()
    assert rec.flush(30) and rec.pending == 0
    assert [(name, args[1]) for name, args in fake.writes] == [("trial_started", "t1")] + [("trial_reported", "t1")] * 3
    assert [args[2] for _, args in fake.writes[1:]] == [1, 2, 3]
    assert [len(b) for b in fake.batches] == [1, 3]  # what queued meanwhile went in one transaction
    rec.on_experiment_end([])


def test_an_outage_queues_writes_and_replays_them_in_order_with_the_next_event(fake):
    fake.down = True
    rec = Recorder("sqlite:///unused.db", "j", {}, retry_s=3600)  # no timed retry: only events and flushes
    rec.on_trial_start(0, [], _trial("t1"))
    for step in (1, 2):
        rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 60.0})
    assert not rec.flush(30)  # the store refused a try made for it: no use waiting out the deadline
    assert rec.pending == 3 and fake.writes == []
    fake.down = False
    rec.on_trial_result(0, [], _trial("t1"), {"step": 3, "metric": 61.0})
    assert rec.flush(30) and rec.pending == 0
    assert [name for name, _ in fake.writes] == ["trial_started"] + ["trial_reported"] * 3
    assert [args[2] for _, args in fake.writes[1:]] == [1, 2, 3]  # in order, each once
    rec.on_experiment_end([])  # nothing left over: no error


def test_a_write_the_store_refuses_holds_up_only_the_writes_after_it(fake):
    fake.gate.clear()
    rec = Recorder("sqlite:///unused.db", "j", {}, retry_s=3600)
    rec.on_trial_start(0, [], _trial("t1"))
    assert fake.entered.wait(30)
    rec.on_trial_result(0, [], _trial("t1"), {"step": 1, "metric": 60.0})
    rec.on_trial_start(0, [], _trial("refused"))
    rec.on_trial_result(0, [], _trial("t1"), {"step": 2, "metric": 61.0})
    fake.gate.set()  # the last three go as one transaction, which the store refuses
    assert not rec.flush(30)
    assert [(name, args[1]) for name, args in fake.writes] == [("trial_started", "t1"), ("trial_reported", "t1")]
    assert rec.pending == 2  # the refused start and the report after it, kept in order
    with pytest.raises(StoreError, match="2 trial record.*refused a write: no trial 'refused'"):
        rec.on_experiment_end([])


def test_the_backlog_drains_by_itself_once_the_store_is_back(fake):
    fake.down = True
    rec = Recorder("sqlite:///unused.db", "j", {}, retry_s=0.05)
    rec.on_trial_start(0, [], _trial("t1"))
    assert not rec.flush(30) and rec.pending == 1
    fake.down = False  # and no event follows: the writer's own retry stores it
    deadline = time.monotonic() + 30
    while rec.pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert rec.pending == 0 and [name for name, _ in fake.writes] == ["trial_started"]
    rec.on_experiment_end([])


def test_every_write_lands_in_order_and_the_end_drains_them(tmp_path):
    url = _job(tmp_path)
    rec = Recorder(url, "j", {})
    for tid in ("t1", "t2"):
        rec.on_trial_start(0, [], _trial(tid))
    for step in range(1, 21):
        for tid in ("t1", "t2"):
            rec.on_trial_result(0, [], _trial(tid), {"step": step, "metric": 50.0 + step})
    done = _trial("t1", {"final": True, "step": 21, "metric": 72.0, "size_bytes": 5, "artifact_uri": "file:///a"})
    rec.on_trial_complete(0, [], done)
    rec.on_trial_error(0, [], _trial("t2"))
    rec.on_experiment_end([])  # returns once everything is in the store
    assert rec.pending == 0
    store = Store(url)
    for tid in ("t1", "t2"):
        history = store.metric_history("j", tid)
        assert [m["step"] for m in history] == list(range(1, 21))
        assert [m["at"] for m in history] == sorted(m["at"] for m in history)  # stored in the order sent
    by_id = {t["trial_id"]: t for t in store.trials("j")}
    assert by_id["t1"]["status"] == "terminated" and by_id["t1"]["metric"] == 72.0
    assert by_id["t1"]["artifact_uri"] == "file:///a"
    assert by_id["t2"]["status"] == "error" and by_id["t2"]["error"] == "trial failed (no error message)"
    deadline = time.monotonic() + 30  # the writer thread ends with the search
    while any(t.name == "recorder-j" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "recorder-j" for t in threading.enumerate())


def test_a_batch_is_one_transaction(tmp_path):
    store = Store(_job(tmp_path))
    start, report = ("trial_started", ("j", "t1", {})), ("trial_reported", ("j", "t1", 1, {"metric": 1.0}))
    with pytest.raises(StoreError, match="no trial 'nope'"):
        store.write_batch([start, report, ("trial_reported", ("j", "nope", 1, {}))])
    assert store.trials("j") == []  # all or none
    with pytest.raises(StoreError, match="no method '_session'"):
        store.write_batch([("_session", ())])
    store.write_batch([start, report])
    assert [t["trial_id"] for t in store.trials("j")] == ["t1"]
    assert [m["step"] for m in store.metric_history("j", "t1")] == [1]


def test_writes_wait_out_a_locked_sqlite(tmp_path):
    url = _job(tmp_path)
    rec = Recorder(url, "j", {})
    rec.on_trial_start(0, [], _trial("t1"))
    assert rec.flush(30)
    lock = sqlite3.connect(tmp_path / "s.db", check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")  # another process holds the database
    try:
        for step in range(1, 51):
            rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 50.0 + step})
        assert rec.pending == 50  # the callbacks returned; nothing could be stored yet
    finally:
        lock.rollback()
    assert rec.flush(30)  # it waited for the lock instead of failing
    assert len(Store(url).metric_history("j", "t1")) == 50 and rec.pending == 0


def test_a_pickled_recorder_keeps_its_backlog_and_no_thread(tmp_path, fake, monkeypatch):
    url = _job(tmp_path)
    fake.down = True
    rec = Recorder(url, "j", {}, retry_s=3600)
    rec.on_trial_start(0, [], _trial("t1"))
    rec.on_trial_result(0, [], _trial("t1"), {"step": 1, "metric": 60.0})
    assert not rec.flush(30)
    restored = pickle.loads(pickle.dumps(rec))  # as Tune keeps it; its thread and lock are not pickled
    with pytest.raises(StoreError, match="2 trial record.*unavailable: connection refused"):
        rec.on_experiment_end([])
    monkeypatch.undo()  # the restored recorder writes to the real store
    assert restored.pending == 2 and restored.flush(30) and restored.pending == 0
    assert [m["step"] for m in Store(url).metric_history("j", "t1")] == [1]
    restored.on_experiment_end([])


def test_unreachable_store_queues_then_fails_loudly():
    rec = Recorder("postgresql+psycopg://nobody@127.0.0.1:1/none", "j", {})  # nothing listens on port 1
    rec.on_trial_start(0, [], _trial("t1"))
    rec.on_trial_result(0, [], _trial("t1"), {"step": 1, "metric": 60.0})
    assert rec.pending == 2
    with pytest.raises(StoreError, match="2 trial record"):
        rec.on_experiment_end([])  # after one more try, not the whole drain deadline


# SQLite cannot be taken away from an open connection; the PostgreSQL server that `make test` starts can.
PG = [os.environ["SLIMRAY_TEST_PG_URL"]] if os.environ.get("SLIMRAY_TEST_PG_URL") else []


@pytest.mark.parametrize("url", PG)
def test_writes_queue_while_postgres_is_down_and_replay_in_order(url):
    pg_dir = os.environ.get("SLIMRAY_PG_DIR", "/tmp/slimray-pg")
    version = sorted((p for p in os.listdir("/usr/lib/postgresql") if p[0].isdigit()), key=int)[-1]
    stop = ["su", "postgres", "-s", "/bin/sh", "-c",
            f"/usr/lib/postgresql/{version}/bin/pg_ctl -D {pg_dir} stop -m fast -w"]
    store = Store(url)
    job = f"outage-{time.time_ns()}"
    store.create_job(job, "o", {}, teacher="t", dataset="d")
    rec = Recorder(url, job, {})
    rec.on_trial_start(0, [], _trial("t1"))
    assert rec.flush(30)
    subprocess.run(stop, check=True, capture_output=True)
    try:
        for step in (1, 2, 3):
            rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 60.0})
        assert rec.pending == 3  # queued, not lost
    finally:
        restarted = subprocess.run(["bash", ".ci/postgres.sh"], capture_output=True, text=True)
        assert restarted.stdout.strip(), restarted.stderr
    rec.on_trial_result(0, [], _trial("t1"), {"step": 4, "metric": 61.0})
    rec.on_experiment_end([])  # drains the backlog, or fails
    steps = [m["step"] for m in Store(url).metric_history(job, "t1")]
    record_fault("PostgreSQL store stopped and restarted during reports", injected=1, trials=1, recorded=1,
                 duplicates=len(steps) - len(set(steps)), lost=4 - len(set(steps)), retried=0)
    assert rec.pending == 0
    assert steps == [1, 2, 3, 4]


def test_trials_the_time_budget_cut_are_closed_as_stopped_early(tmp_path):
    from orchestrator.jobs import close_unfinished

    store = Store(f"sqlite:///{tmp_path / 'cut.db'}")
    store.create_job("j", "cut", {}, teacher="t", dataset="d")
    for tid in ("done", "cut", "never_reported"):
        store.trial_started("j", tid, {})
    store.trial_reported("j", "done", 10, {"metric": 70.0})
    store.trial_finished("j", "done", "terminated", {"metric": 71.0, "size_bytes": 5})
    store.trial_reported("j", "cut", 10, {"metric": 60.0})
    store.trial_reported("j", "cut", 20, {"metric": 65.0})
    assert close_unfinished(store, "j") == ["cut", "never_reported"]
    by_id = {t["trial_id"]: t for t in store.trials("j")}
    assert by_id["done"]["status"] == "terminated" and by_id["done"]["metric"] == 71.0
    assert by_id["cut"]["status"] == "stopped_early" and by_id["cut"]["metric"] == 65.0
    assert by_id["never_reported"]["status"] == "stopped_early" and by_id["never_reported"]["metric"] is None
    assert close_unfinished(store, "j") == []
