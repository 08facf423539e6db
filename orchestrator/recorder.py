"""The driver's Tune callback: every trial start, report, completion and failure lands in the SQL store.

It runs in the driver only (one writer). Tune's callbacks only queue a write: one writer thread stores them in
order, each burst in one transaction, so a slow store never holds up Tune's event loop (a round trip per event
cost the driver 7% at 1,000 trials into PostgreSQL, bench/scale.py). It is pickled with the Tuner's state for
``Tuner.restore``, so it holds the store's URL and opens the store, and starts the thread, lazily.
"""
from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from itertools import islice
from pathlib import Path

from ray.tune import Callback

__all__ = ["Recorder", "STEP_KEYS"]

log = logging.getLogger(__name__)
# what per-step history keeps of a report (Tune adds many bookkeeping keys)
STEP_KEYS = ("step", "metric", "metric_drop", "accuracy", "f1", "size_bytes", "latency_ms_b1", "latency_ms_b32")
# writes per transaction: a burst commits once, a backlog after an outage in bounded pieces
BATCH_MAX = 200


class Recorder(Callback):
    """Writes go through ``_write`` onto the backlog; the writer thread stores them oldest first. While the
    store is unreachable they stay queued in order (the Store already retried each briefly) and are tried again
    with the next event or after ``retry_s``. The search's end waits up to ``drain_s`` for the backlog to drain;
    if some writes still cannot be stored then, the job fails loudly instead of losing them."""

    def __init__(self, db_url: str, job_id: str, base_config=None,  # the job's TrialConfig defaults
                 drain_s: float = 120.0, retry_s: float = 5.0):
        self.db_url, self.job_id, self.base_config = db_url, job_id, base_config
        self.drain_s, self.retry_s = drain_s, retry_s
        self._store = None  # the writer thread's own
        self._backlog: deque[tuple[str, tuple]] = deque()  # every write not yet stored, the batch in hand included
        self._cond = threading.Condition()  # guards the backlog and the writer's bookkeeping below
        self._writer: threading.Thread | None = None
        self._stop = False
        self._tries = self._stuck_try = 0  # numbered store tries, and the last that failed on the oldest write alone
        self._failing = False  # the last try failed
        self._flushing = 0  # callers waiting in flush: a failed try is retried at once for them
        self._error = ""

    def __getstate__(self):
        with self._cond:
            backlog = list(self._backlog)
        return {"db_url": self.db_url, "job_id": self.job_id, "base_config": self.base_config,
                "drain_s": self.drain_s, "retry_s": self.retry_s, "backlog": backlog}

    def __setstate__(self, state):
        self.__init__(state["db_url"], state["job_id"], state["base_config"],
                      state.get("drain_s", 120.0), state.get("retry_s", 5.0))
        # a Recorder pickled before the writer thread kept its queue in _pending
        self._backlog.extend(state.get("backlog", state.get("_pending", ())))

    @property
    def pending(self) -> int:
        """Writes not yet in the store: queued, or in the transaction under way."""
        return len(self._backlog)

    def _write(self, method: str, *args) -> None:
        with self._cond:
            self._backlog.append((method, args))
            self._start_writer()
            self._cond.notify_all()

    def _start_writer(self) -> None:  # under the lock
        self._stop = False
        if self._writer is None:
            self._writer = threading.Thread(target=self._drain, name=f"recorder-{self.job_id}", daemon=True)
            self._writer.start()

    def _drain(self) -> None:
        """The writer thread: stores the backlog oldest first, ``BATCH_MAX`` writes per transaction."""
        while True:
            with self._cond:
                while not self._backlog and not self._stop:
                    self._cond.wait()
                if self._stop:
                    self._writer = None  # under the lock: a later _write starts a new writer
                    self._close_store()
                    return
                # after a failure the oldest write goes alone: one the store refuses holds up only those after it
                batch = list(islice(self._backlog, 1 if self._failing else BATCH_MAX))
                self._tries += 1
                attempt = self._tries
            try:
                if self._store is None:
                    from db import Store

                    self._store = Store(self.db_url)
                self._store.write_batch(batch)
            except Exception as err:  # kept queued whatever went wrong; the search's end reports it
                self._close_store()  # reconnect next time
                with self._cond:
                    self._failing, self._error = True, (str(err).splitlines() or [type(err).__name__])[0]
                    if len(batch) == 1:  # the oldest write cannot be stored now
                        self._stuck_try = attempt
                        log.warning("store unreachable, %d write(s) queued: %s", len(self._backlog), self._error)
                        self._cond.notify_all()
                        if not self._stop and not self._flushing:
                            self._cond.wait(self.retry_s)  # or until the next event or a flush
                continue
            with self._cond:
                self._failing = False
                for _ in batch:
                    self._backlog.popleft()
                self._cond.notify_all()

    def _close_store(self) -> None:
        store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except Exception:  # a connection already gone; nothing left to release
                pass

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every queued write to be stored; True when none is left. A store
        that refuses the writes ends the wait early: once a try of the oldest write, begun after this call, failed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._backlog:
                self._start_writer()  # none yet after an unpickling, or stopped at a search's end
            asked = self._tries
            self._flushing += 1
            self._cond.notify_all()  # a writer waiting out a failure tries again now
            try:
                while self._backlog and self._stuck_try <= asked:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
            return not self._backlog

    def on_experiment_end(self, trials, **info):
        from common.errors import StoreError

        stored = self.flush(self.drain_s)
        with self._cond:  # the thread ends; a resumed search starts another
            self._stop = True
            self._cond.notify_all()
            failed = self._failing
        if not stored:
            why = self._error if failed else f"not all stored within {self.drain_s:g} s"
            raise StoreError(f"{self.pending} trial record(s) of job {self.job_id} could not be written to the "
                             f"store ({why}); the search results are in Tune's state, resume the job once the "
                             f"store is back")

    def on_trial_start(self, iteration, trials, trial, **info):
        from common.errors import ConfigError
        from search.adapters import to_trial_config, trial_config

        try:
            config = trial_config(trial.config, self.base_config).model_dump(mode="json", exclude_none=True)
        except ConfigError:  # the trial fails on it and records why; keep the point as it was sampled
            config = to_trial_config(trial.config)
        self._write("trial_started", self.job_id, trial.trial_id, config)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final"):
            return  # the final result is stored by on_trial_complete
        values = {k: result[k] for k in STEP_KEYS if k in result}
        self._write("trial_reported", self.job_id, trial.trial_id, int(result.get("step", 0)), values)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        if result.get("infeasible"):  # never trained: its metric was the searcher's worst case, not a measurement
            result = {k: v for k, v in result.items() if k not in ("metric", "metric_drop")}
            self._write("trial_finished", self.job_id, trial.trial_id, "stopped_early", _clean(result))
        elif result.get("final"):
            self._write("trial_finished", self.job_id, trial.trial_id, "terminated", _clean(result))
            if result.get("artifact_uri"):
                self._write("add_artifact", self.job_id, trial.trial_id, result["artifact_uri"],
                            int(result.get("size_bytes", 0)), result.get("sha256", ""))
        else:  # the scheduler stopped it before the recipe finished (ASHA)
            self._write("trial_finished", self.job_id, trial.trial_id, "stopped_early", _clean(result))

    def on_trial_recover(self, iteration, trials, trial, **info):
        # a crashed trial that Tune will retry: keep its error; the retry's start counts the next attempt
        self._record_error(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_error(trial)

    def _record_error(self, trial):
        text = ""
        err_file = getattr(trial, "error_file", None)
        if err_file and Path(err_file).is_file():
            text = re.sub(r"\x1b\[[0-9;]*m", "", Path(err_file).read_text(errors="replace"))  # Ray colours it
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        line = lines[-1] if lines else "trial failed (no error message)"
        self._write("trial_failed", self.job_id, trial.trial_id, line[:500], text or None)


def _clean(result: dict) -> dict:
    drop = {"config", "trial_id", "experiment_id", "date", "timestamp", "pid", "hostname", "node_ip",
            "time_since_restore", "iterations_since_restore", "checkpoint_dir_name", "experiment_tag", "done",
            "training_iteration", "time_this_iter_s", "time_total_s", "final"}
    return {k: v for k, v in result.items() if k not in drop and isinstance(v, (int, float, str, bool))}
