"""Stops a running search when its job is marked cancelled in the store (by `slimray cancel`, from anywhere)."""
from __future__ import annotations

import time

from ray.tune import Stopper

__all__ = ["CancelStopper"]


class CancelStopper(Stopper):
    def __init__(self, db_url: str, job_id: str, every_s: float = 2.0):
        self.db_url, self.job_id, self.every_s = db_url, job_id, every_s
        self._last, self._cancelled, self._store = 0.0, False, None

    def __getstate__(self):
        return {**self.__dict__, "_store": None}

    def __call__(self, trial_id, result):
        return self.stop_all()

    def stop_all(self):
        if not self._cancelled and time.monotonic() - self._last > self.every_s:
            from db import Store

            self._last = time.monotonic()
            self._store = self._store or Store(self.db_url)
            self._cancelled = self._store.get_job(self.job_id)["status"] == "cancelled"
        return self._cancelled
