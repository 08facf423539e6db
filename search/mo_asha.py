"""Multi-objective asynchronous successive halving (MO-ASHA; Schmucker et al. 2021): ASHA's rungs, but a trial
is judged at a rung by its place on the Pareto fronts of everything recorded there, not by one metric.

Rungs sit at ``grace_period * reduction_factor**k`` (up to ``max_t``) on the ``time_attr`` axis. When a trial
first reports at or past a rung, its objective vector is recorded there and the trial, with n results now at
that rung, is ranked among them by :func:`search.pareto.ranks` (front, then crowding distance). It continues when

* n ≤ reduction_factor: the first η to arrive have nothing to be ranked against; or
* it is on the rung's Pareto front: a non-dominated trial is what the search is looking for, and stopping it
  would throw away a front member (the failure of accuracy-only ASHA this scheduler exists to fix); or
* its rank is below ceil(n / η): the top 1/η, rounded up as ASHA's quantile cutoff keeps ties.

Otherwise it stops. A result without every objective (or with a non-finite one) is not ranked: the trial
continues and nothing is recorded. Trials reaching ``max_t`` stop, as in Tune's ASHA.
"""
from __future__ import annotations

import math
import pickle
from numbers import Real

from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

from common.errors import ConfigError
from search.objectives import DIRECTIONS
from search.pareto import dominated_by, ranks

__all__ = ["MOASHAScheduler"]


class MOASHAScheduler(FIFOScheduler):
    """``objectives``: ``[(name, "max"|"min"), ...]`` as the trial reports them, e.g. metric, size_bytes and
    latency_ms_b1. Decisions only read each rung's recorded vectors, so the scheduler needs no per-trial
    bookkeeping from ``on_trial_add`` and survives a Tuner restore that skips it."""

    def __init__(self, time_attr: str = "step", objectives=(("metric", "max"),), max_t: int = 100,
                 grace_period: int = 1, reduction_factor: float = 4):
        super().__init__()
        objectives = tuple(tuple(o) for o in objectives)
        if not objectives or any(len(o) != 2 or o[1] not in DIRECTIONS for o in objectives):
            raise ConfigError(f"objectives: must be a non-empty list of (name, max|min) pairs, got {objectives!r}")
        if not (isinstance(grace_period, Real) and isinstance(max_t, Real) and 0 < grace_period <= max_t):
            raise ConfigError(f"grace_period: must be > 0 and ≤ max_t ({max_t!r}), got {grace_period!r}")
        if not (isinstance(reduction_factor, Real) and 1 < reduction_factor < math.inf):
            raise ConfigError(f"reduction_factor: must be a number > 1, got {reduction_factor!r}")
        self._time_attr = time_attr
        self._names = [name for name, _ in objectives]
        self._directions = [direction for _, direction in objectives]
        self._max_t = max_t
        self._rf = reduction_factor
        milestones, t = [], grace_period
        while t <= max_t:
            milestones.append(t)
            t *= reduction_factor
        # {milestone: {trial_id: objective vector}} in arrival order (dicts keep it; tests read it)
        self.rungs: dict = {m: {} for m in milestones}
        self.num_stopped = 0

    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # the objectives are the scheduler's own; TuneConfig's single metric does not apply

    def _vector(self, result: dict) -> list[float] | None:
        values = [result.get(name) for name in self._names]
        if all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            return [float(v) for v in values]
        return None

    def _record(self, trial_id: str, t, vector: list[float]) -> str:
        """Record ``vector`` at the highest rung ``t`` has reached and this trial has not; decide there."""
        for milestone in sorted(self.rungs, reverse=True):
            recorded = self.rungs[milestone]
            if t < milestone or trial_id in recorded:
                continue
            recorded[trial_id] = vector
            return self._decide(recorded, trial_id)
        return TrialScheduler.CONTINUE

    def _decide(self, recorded: dict, trial_id: str) -> str:
        n = len(recorded)
        if n <= self._rf:
            return TrialScheduler.CONTINUE
        ids = list(recorded)
        values = [recorded[i] for i in ids]
        me, keep = ids.index(trial_id), math.ceil(n / self._rf)
        # Two O(n) shortcuts decide most arrivals without sorting the rung: no dominator means the front; and
        # every dominator sits on an earlier front, so ahead of it, so as many dominators as places means out.
        dominators = dominated_by(values, self._directions, me)
        if dominators == 0:
            return TrialScheduler.CONTINUE
        if dominators >= keep:
            return TrialScheduler.STOP
        return TrialScheduler.CONTINUE if ranks(values, self._directions)[me] < keep else TrialScheduler.STOP

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        t = result.get(self._time_attr)
        if not isinstance(t, Real):
            return TrialScheduler.CONTINUE
        vector = self._vector(result)
        action = TrialScheduler.CONTINUE if vector is None else self._record(trial.trial_id, t, vector)
        if t >= self._max_t:
            action = TrialScheduler.STOP
        if action == TrialScheduler.STOP:
            self.num_stopped += 1
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        # a finished trial's last result still fills the rungs it reached, so later arrivals meet it there
        t, vector = result.get(self._time_attr), self._vector(result)
        if isinstance(t, Real) and vector is not None:
            self._record(trial.trial_id, t, vector)

    def debug_string(self) -> str:
        rungs = ", ".join(f"{m:g}: {len(r)}" for m, r in sorted(self.rungs.items()))
        return f"Using MO-ASHA on {', '.join(self._names)}: num_stopped={self.num_stopped}; recorded per rung {rungs}"

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as fh:
            pickle.dump({"rungs": self.rungs, "num_stopped": self.num_stopped}, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self.rungs, self.num_stopped = state["rungs"], state["num_stopped"]
