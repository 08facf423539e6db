"""The recorder never loses a write when the store is briefly unreachable, and fails loudly when it stays so."""
import os
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


def _trial(tid):
    return SimpleNamespace(trial_id=tid, config=CONFIG, last_result={}, error_file=None)


def test_writes_wait_out_a_locked_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    Store(url).create_job("j", "j", {}, teacher="t", dataset="d")
    rec = Recorder(url, "j", {})
    rec.on_trial_start(0, [], _trial("t1"))
    lock = sqlite3.connect(tmp_path / "s.db", check_same_thread=False)
    lock.execute("BEGIN EXCLUSIVE")
    threading.Timer(2.0, lock.rollback).start()  # another process holds the database for 2 s
    t0 = time.time()
    for step in range(1, 51):
        rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 50.0 + step})
    assert time.time() - t0 >= 1.5  # it waited for the lock instead of failing
    assert len(Store(url).metric_history("j", "t1")) == 50 and rec.pending == 0


def test_unreachable_store_queues_then_fails_loudly():
    rec = Recorder("postgresql+psycopg://nobody@127.0.0.1:1/none", "j", {})  # nothing listens on port 1
    rec.on_trial_start(0, [], _trial("t1"))
    rec.on_trial_result(0, [], _trial("t1"), {"step": 1, "metric": 60.0})
    assert rec.pending == 2
    with pytest.raises(StoreError, match="2 trial record"):
        rec.on_experiment_end([])


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
    subprocess.run(stop, check=True, capture_output=True)
    try:
        for step in (1, 2, 3):
            rec.on_trial_result(0, [], _trial("t1"), {"step": step, "metric": 60.0})
        assert rec.pending == 3  # queued, not lost
    finally:
        restarted = subprocess.run(["bash", ".ci/postgres.sh"], capture_output=True, text=True)
        assert restarted.stdout.strip(), restarted.stderr
    rec.on_trial_result(0, [], _trial("t1"), {"step": 4, "metric": 61.0})
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
