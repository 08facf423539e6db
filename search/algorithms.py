"""Which searcher and scheduler a job runs: :class:`SearchSettings` in, Tune objects out of :func:`make`.

Multi-objective search leaves ``TuneConfig`` without metric/mode: Tune's own metric is a single
string, so the objectives go to ``OptunaSearch`` (and to MO-ASHA) only, and metric ASHA gets its own
single metric.
"""
from __future__ import annotations

from typing import ClassVar, Literal, Optional

from pydantic import Field, model_validator

from common.config import Float, Frozen, Int, Problems, Str
from common.errors import SpecError
from search.adapters import build, optuna_space
from search.objectives import DIRECTIONS, OBJECTIVES, Objective
from search.space import SearchSpace

__all__ = ["ALGORITHMS", "SCHEDULERS", "SearchSettings", "make", "param_space_for"]

ALGORITHMS = ("tpe", "nsga2", "random", "grid")
SCHEDULERS = ("mo", "metric", "none")


class SearchSettings(Frozen):
    """How to search: the searcher, and the scheduler that stops unpromising trials early."""

    _prefix: ClassVar[str] = "algorithm"
    _error: ClassVar[type] = SpecError

    name: Literal[ALGORITHMS] = Field("tpe", description="tpe | nsga2 (Optuna, multi-objective) | random | grid "
                                                         "(Tune's variant generator)")
    asha: Literal[SCHEDULERS] = Field(
        "metric", description="mo: multi-objective ASHA over the objectives (a job spec's default); metric: "
                              "ASHA on asha_metric alone; none: every trial runs to the end. Specs of earlier "
                              "versions say true (metric) or false (none)")
    asha_metric: Literal[OBJECTIVES] = Field("metric", description="what metric ASHA stops on; a trial reports "
                                                                   "it at every time_attr step")
    asha_mode: Literal[DIRECTIONS] = "max"
    time_attr: Str = Field("step", min_length=1, description="the counter trials report, like step")
    max_t: Int = Field(100, ge=1, description="the last rung")
    grace_period: Int = Field(1, ge=1, description="the first rung")
    reduction_factor: Float = Field(4, gt=1, description="ASHA keeps 1/reduction_factor at each rung")
    seed: Optional[Int] = Field(0, ge=0, lt=2**32, description="seeds the Optuna sampler / Tune's variant "
                                                              "generator; null draws a fresh one")
    startup_trials: Optional[Int] = Field(
        None, ge=1, description="tpe: trials sampled at random before TPE models the results; default: a third of "
                                "budget.num_trials, between 3 and 10 (Optuna's own 10 is the whole of a small search)")

    @model_validator(mode="before")
    @classmethod
    def _earlier_forms(cls, data):
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "algorithm" in data and "name" not in data:  # how specs before `name` wrote it
            data["name"] = data.pop("algorithm")
        if isinstance(data.get("asha"), bool):  # earlier versions: true was single-metric ASHA
            data["asha"] = "metric" if data["asha"] else "none"
        return data

    @model_validator(mode="after")
    def _rungs(self):
        if self.grace_period > self.max_t:
            raise Problems(("grace_period", f"must be ≤ max_t ({self.max_t}), got {self.grace_period}"))
        return self


def _optuna(space: SearchSpace, objectives: tuple[Objective, ...], sampler):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=optuna_space(space), sampler=sampler, metric=[o.name for o in objectives],
                        mode=[o.mode for o in objectives])


def startup_trials(settings: SearchSettings, num_trials: int | None) -> int:
    """TPE's random start-up: Optuna waits 10 trials, so a 10-trial search never used its model."""
    if settings.startup_trials is not None:
        return settings.startup_trials
    return 10 if num_trials is None else min(10, max(3, num_trials // 3))


def _tpe(space, settings, objectives, num_trials=None):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=settings.seed, n_startup_trials=startup_trials(settings, num_trials))
    return _optuna(space, objectives, sampler)


def _nsga2(space, settings, objectives):
    import optuna

    return _optuna(space, objectives, optuna.samplers.NSGAIISampler(seed=settings.seed))


def _variants(space, settings, max_concurrent: int = 0):
    """Random and grid search: Tune's generator samples the ``param_space`` from :func:`param_space_for`.

    Grid search enumerates only the categorical dimensions (lists of choices): ranges have no grid,
    so each grid point draws them at random, and ``num_samples`` repeats the whole grid. Gated
    choices (``prune.importance``, ``quant.group_size``) are drawn, not enumerated, so a grid point
    whose parent is off is not repeated once per value of a knob it ignores.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


def _scheduler(settings: SearchSettings, objectives: tuple[Objective, ...]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.asha == "none":
        return FIFOScheduler()
    if settings.asha == "mo":
        from search.mo_asha import MOASHAScheduler

        return MOASHAScheduler(time_attr=settings.time_attr, objectives=[(o.name, o.mode) for o in objectives],
                               max_t=settings.max_t, grace_period=settings.grace_period,
                               reduction_factor=settings.reduction_factor)
    return ASHAScheduler(time_attr=settings.time_attr, metric=settings.asha_metric, mode=settings.asha_mode,
                         max_t=settings.max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


def make(space: SearchSpace, settings: SearchSettings, objectives: tuple[Objective, ...], max_concurrent: int = 0,
         num_trials: int | None = None):
    """``(search_alg, scheduler)`` for ``TuneConfig``; pass ``param_space_for(space, settings)`` to the Tuner
    and give ``TuneConfig`` no metric/mode (the searcher and the scheduler carry their own). ``max_concurrent``
    (0 = no limit) is built into the searcher: Tune ignores ``max_concurrent_trials`` for a ready-made
    search_alg."""
    if settings.name in ("random", "grid"):
        return _variants(space, settings, max_concurrent), _scheduler(settings, objectives)
    if settings.name == "tpe":
        searcher = _tpe(space, settings, objectives, num_trials)
    else:
        searcher = _nsga2(space, settings, objectives)
    if max_concurrent:
        from ray.tune.search import ConcurrencyLimiter

        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return searcher, _scheduler(settings, objectives)


def param_space_for(space: SearchSpace, settings: SearchSettings) -> dict:
    """What to pass as ``Tuner(param_space=...)``: ``{}`` for Optuna, whose searcher holds the space
    (Tune refuses a second one), else :func:`search.adapters.build` (with grid_search for ``grid``)."""
    if settings.name in ("tpe", "nsga2"):
        return {}
    return build(space, grid=settings.name == "grid")
