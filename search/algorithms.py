"""Which searcher and scheduler a job runs: :class:`SearchSettings` in, Tune objects out of :func:`make`.

Multi-objective search leaves ``TuneConfig`` without metric/mode: Tune's own metric is a single
string, so the objectives go to ``OptunaSearch`` only and ASHA gets its own single metric.
"""
from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, fields

from search.objectives import DIRECTIONS, OBJECTIVES
from search.space import SearchSpace, build, optuna_space
from common.errors import SpecError

__all__ = ["ALGORITHMS", "SearchSettings", "make", "param_space_for"]

ALGORITHMS = ("tpe", "nsga2", "random", "grid")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _objectives(raw, problems: list) -> tuple:
    """``[(name, dir)]``, ``["name:dir"]`` or ``{name: dir}`` as a tuple of pairs; problems noted."""
    if isinstance(raw, dict):
        raw = list(raw.items())
    if not isinstance(raw, (list, tuple)) or not raw:
        problems.append(f"objectives: must be a non-empty list like [[metric, max], [size_bytes, min]], "
                        f"got {_show(raw)}")
        return ()
    out = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item.count(":") == 1:
            item = tuple(s.strip() for s in item.split(":"))
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            problems.append(f"objectives[{i}]: must be a (name, max|min) pair, got {_show(item)}")
            continue
        name, direction = item
        if name not in OBJECTIVES:
            problems.append(f"objectives[{i}]: no trial reports {_show(name)}; use one of {', '.join(OBJECTIVES)}")
        elif direction not in DIRECTIONS:
            problems.append(f"objectives[{i}]: direction must be max or min, got {_show(direction)}")
        elif any(name == n for n, _ in out):
            problems.append(f"objectives[{i}]: {name} is listed twice; list each objective once")
        else:
            out.append((name, direction))
    return tuple(out)


def _int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


@dataclass(frozen=True)
class SearchSettings:
    """How to search. Errors name the bare field (``max_t: ...``) so a caller can prefix its own path."""

    algorithm: str = "tpe"  # tpe | nsga2 (Optuna, multi-objective) | random | grid (Tune's variant generator)
    objectives: tuple = (("metric", "max"), ("size_bytes", "min"), ("latency_ms_b1", "min"))
    asha: bool = True
    asha_metric: str = "metric"  # ASHA stops on one metric a trial reports at every time_attr step
    asha_mode: str = "max"
    time_attr: str = "step"
    max_t: int = 100
    grace_period: int = 1
    reduction_factor: float = 4
    seed: int | None = 0  # seeds the Optuna sampler / Tune's variant generator; None draws a fresh one

    def __post_init__(self):
        problems: list[str] = []
        object.__setattr__(self, "objectives", _objectives(self.objectives, problems))
        if self.algorithm not in ALGORITHMS:
            problems.append(f"algorithm: must be one of {'|'.join(ALGORITHMS)}, got {_show(self.algorithm)}")
        if not isinstance(self.asha, bool):
            problems.append(f"asha: must be true or false, got {_show(self.asha)}")
        if self.asha_metric not in OBJECTIVES:
            problems.append(f"asha_metric: no trial reports {_show(self.asha_metric)}; "
                            f"use one of {', '.join(OBJECTIVES)}")
        if self.asha_mode not in DIRECTIONS:
            problems.append(f"asha_mode: must be max or min, got {_show(self.asha_mode)}")
        else:
            for name, direction in self.objectives:
                if name == self.asha_metric and direction != self.asha_mode:
                    problems.append(f"asha_mode: {self.asha_mode} contradicts objective {name}:{direction}; "
                                    "use the same direction")
        if not isinstance(self.time_attr, str) or not self.time_attr:
            problems.append(f"time_attr: must be the name of a counter trials report, like step, got "
                            f"{_show(self.time_attr)}")
        if not _int(self.max_t, 1):
            problems.append(f"max_t: must be an integer ≥ 1, got {_show(self.max_t)}")
        if not _int(self.grace_period, 1):
            problems.append(f"grace_period: must be an integer ≥ 1, got {_show(self.grace_period)}")
        elif _int(self.max_t, 1) and self.grace_period > self.max_t:
            problems.append(f"grace_period: must be ≤ max_t ({self.max_t}), got {self.grace_period}")
        rf = self.reduction_factor
        if not (isinstance(rf, numbers.Real) and not isinstance(rf, bool) and 1 < rf < float("inf")):
            problems.append(f"reduction_factor: must be a number > 1 (ASHA keeps 1/reduction_factor), got {_show(rf)}")
        if self.seed is not None and not (_int(self.seed, 0) and self.seed < 2**32):
            problems.append(f"seed: must be an integer in [0, 2^32) or null, got {_show(self.seed)}")
        if problems:
            raise SpecError(problems)

    @classmethod
    def from_dict(cls, d) -> "SearchSettings":
        """Parse a mapping of the fields above; raises SpecError listing every problem."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise SpecError([f"settings: must be a mapping, got {_show(d)}"])
        names = [f.name for f in fields(cls)]
        unknown = sorted((k for k in d if k not in names), key=str)
        problems = [f"{k}: unknown key; allowed: {', '.join(names)}" for k in unknown]
        try:
            settings = cls(**{k: v for k, v in d.items() if k in names})
        except SpecError as err:
            problems += err.problems
        if problems:
            raise SpecError(problems)
        return settings

    def to_dict(self) -> dict:
        """JSON-ready; ``from_dict(to_dict())`` gives equal settings."""
        return {**asdict(self), "objectives": [list(o) for o in self.objectives]}


def _optuna(space: SearchSpace, settings: SearchSettings, sampler):
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(space=optuna_space(space), sampler=sampler,
                        metric=[name for name, _ in settings.objectives],
                        mode=[direction for _, direction in settings.objectives])


def _tpe(space, settings):
    import optuna

    return _optuna(space, settings, optuna.samplers.TPESampler(seed=settings.seed))


def _nsga2(space, settings):
    import optuna

    return _optuna(space, settings, optuna.samplers.NSGAIISampler(seed=settings.seed))


def _variants(space, settings, max_concurrent: int = 0):
    """Random and grid search: Tune's generator samples the ``param_space`` from :func:`param_space_for`.

    Grid search enumerates only the categorical dimensions (lists of choices): ranges have no grid,
    so each grid point draws them at random, and ``num_samples`` repeats the whole grid. Gated
    choices (``prune.importance``, ``quant.group_size``) are drawn, not enumerated, so a grid point
    whose parent is off is not repeated once per value of a knob it ignores.
    """
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=settings.seed, max_concurrent=max_concurrent)


_SEARCHERS = {"tpe": _tpe, "nsga2": _nsga2, "random": _variants, "grid": _variants}


def _scheduler(settings: SearchSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if not settings.asha:
        return FIFOScheduler()
    return ASHAScheduler(time_attr=settings.time_attr, metric=settings.asha_metric, mode=settings.asha_mode,
                         max_t=settings.max_t, grace_period=settings.grace_period,
                         reduction_factor=settings.reduction_factor)


def make(space: SearchSpace, settings: SearchSettings, max_concurrent: int = 0):
    """``(search_alg, scheduler)`` for ``TuneConfig``; pass ``param_space_for(space, settings)`` to the Tuner
    and give ``TuneConfig`` no metric/mode (the searcher and ASHA carry their own). ``max_concurrent`` (0 = no
    limit) is built into the searcher: Tune ignores ``max_concurrent_trials`` for a ready-made search_alg."""
    if settings.algorithm in ("random", "grid"):
        return _variants(space, settings, max_concurrent), _scheduler(settings)
    searcher = _SEARCHERS[settings.algorithm](space, settings)
    if max_concurrent:
        from ray.tune.search import ConcurrencyLimiter

        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent)
    return searcher, _scheduler(settings)


def param_space_for(space: SearchSpace, settings: SearchSettings) -> dict:
    """What to pass as ``Tuner(param_space=...)``: ``{}`` for Optuna, whose searcher holds the space
    (Tune refuses a second one), else :func:`search.space.build` (with grid_search for ``grid``)."""
    if settings.algorithm in ("tpe", "nsga2"):
        return {}
    return build(space, grid=settings.algorithm == "grid")
