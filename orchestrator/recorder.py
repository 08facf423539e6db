"""The driver's Tune callback: every trial start, report, completion and failure lands in the SQL store.

It runs in the driver only (one writer). It is pickled with the Tuner's state for ``Tuner.restore``, so it
holds the store's URL and opens the store lazily.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

from ray.tune import Callback

__all__ = ["Recorder", "STEP_KEYS"]

log = logging.getLogger(__name__)
# what per-step history keeps of a report (Tune adds many bookkeeping keys)
STEP_KEYS = ("step", "metric", "metric_drop", "accuracy", "f1", "size_bytes", "latency_ms_b1", "latency_ms_b32")


class Recorder(Callback):
    """Writes go through ``_write``: while the store is unreachable they queue up in order (the Store already
    retried each briefly) and are replayed with the next event; if some still cannot be written when the
    search ends, the job fails loudly instead of losing them."""

    def __init__(self, db_url: str, job_id: str, base_config=None):  # the job's TrialConfig defaults
        self.db_url, self.job_id, self.base_config = db_url, job_id, base_config
        self._store = None
        self._pending: list[tuple[str, tuple]] = []

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    @property
    def store(self):
        if self._store is None:
            from db import Store

            self._store = Store(self.db_url)
        return self._store

    def _write(self, method: str, *args) -> None:
        self._pending.append((method, args))
        self._flush()

    def _flush(self) -> None:
        from common.errors import StoreError

        try:
            while self._pending:
                name, call_args = self._pending[0]
                getattr(self.store, name)(*call_args)
                self._pending.pop(0)
        except StoreError as err:
            self._store = None  # reconnect next time
            log.warning("store unreachable, %d write(s) queued: %s", len(self._pending), err)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def on_experiment_end(self, trials, **info):
        from common.errors import StoreError

        self._flush()  # one more try of everything, in order
        if self._pending:
            raise StoreError(f"{len(self._pending)} trial record(s) of job {self.job_id} could not be written to "
                             f"the store; the search results are in Tune's state, resume the job once the store is "
                             f"back")

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
