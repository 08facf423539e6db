"""Warm start: earlier jobs' finished trials as already-evaluated points of a new search.

:func:`flat_params` is the pure part: a trial config as the store keeps it (the nested, validated
``TrialConfig`` dump) becomes the flat params the new space's sampler would have suggested for it, or ``None``
when the config lies outside that space. Inside means every searched knob holds one of its choices, or a value
within its range and on its step, and every knob the space does not search equals what the new job would use
(its fixed values and the job's trial defaults), so the old result is what the new job would measure.

:func:`seed` adds such points to an Optuna searcher's study as completed trials: the sampler learns from them
and Tune never runs them. Tune's variant generator (random, grid) has nothing to learn, so nothing is seeded.
"""
from __future__ import annotations

import math
from numbers import Real

from search.adapters import optuna_space, trial_config
from search.space import DIMENSIONS, GATES, Choice, Fixed, Range, SearchSpace
from common.trial_config import TrialConfig

__all__ = ["flat_params", "seed", "study_of"]

# How a stored config says a tagged section or low-rank factorization is off: by leaving it out.
_ABSENT = {"prune.kind": "none", "quant.mode": "none", "lowrank.ratio": DIMENSIONS["lowrank.ratio"].off}


def _inside(dim, value, kind: type) -> bool:
    if isinstance(dim, Fixed):
        return value == dim.value
    if isinstance(dim, Choice):
        return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in dim.values)
    if isinstance(value, bool) or not isinstance(value, Real) or (kind is int and not isinstance(value, int)):
        return False
    if not dim.low <= value <= dim.high:
        return False
    if dim.step is None:
        return True
    k = (value - dim.low) / dim.step
    return abs(k - round(k)) <= 1e-9 * max(1.0, abs(k))


def flat_params(config: dict, space: SearchSpace, base: TrialConfig | None = None) -> dict | None:
    """The flat params (``{"prune.kind": "heads", ...}``) that the new ``space``'s define-by-run sampler
    suggests for the stored trial ``config``, with ``base`` the new job's trial defaults; ``None`` when the
    config lies outside the space or differs from the new job in a knob the space does not search."""
    if not isinstance(config, dict):
        return None
    suggested, chosen = {}, {}
    for name, dim in space.dims:
        parent, on = GATES.get(name, (None, None))
        if parent in chosen and chosen[parent] not in on:
            continue  # the sampler never suggests a knob its parent switched off
        section, key = name.split(".")
        body = config.get(section)
        value = body.get(key) if isinstance(body, dict) else None
        if value is None and not (name == "lowrank.ratio" and body is not None):  # (a ratio left out for energy)
            value = _ABSENT.get(name)
        if value is None or not _inside(dim, value, DIMENSIONS[name].type):
            return None
        chosen[name] = value
        if not isinstance(dim, Fixed):
            suggested[name] = value
    try:
        rebuilt = trial_config(chosen, base).model_dump(mode="json", exclude_none=True)
    except Exception:  # a point the new job's defaults make invalid is outside its space
        return None
    return suggested if rebuilt == config else None


def study_of(searcher):
    """The Optuna study inside a Tune searcher (through a ConcurrencyLimiter), or ``None`` (random, grid)."""
    inner = getattr(searcher, "searcher", searcher)
    return getattr(inner, "_ot_study", None)


def seed(searcher, space: SearchSpace, points: list[tuple[dict, list[float]]]) -> int:
    """Add ``(flat params, objective values)`` pairs to ``searcher``'s study as completed trials; returns how
    many. The distributions come from replaying the space's own suggest calls, so they are exactly those the
    sampler will ask with (Optuna refuses a parameter whose distribution changes)."""
    study = study_of(searcher)
    if study is None:
        return 0
    import optuna

    suggest = optuna_space(space)
    # NSGA-II breeds only from trials tagged with a generation: the seeds make up its first one
    generation = getattr(study.sampler, "_get_generation_key", None)
    system_attrs = {generation(): 0} if generation else {}
    n = 0
    for params, values in points:
        if len(values) != len(study.directions) or not all(math.isfinite(v) for v in values):
            continue
        replay = optuna.trial.FixedTrial(params)
        suggest(replay)
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.COMPLETE, values=list(values),
                                                  params=replay.params, distributions=replay.distributions,
                                                  user_attrs={"warm_start": True}, system_attrs=system_attrs))
        n += 1
    if n:  # the same sampler seed would replay the earlier job's random start-up points: draw fresh ones
        study.sampler.reseed_rng()
    return n
