"""Search spaces as the samplers want them: a Ray Tune ``param_space`` and an Optuna define-by-run function,
and the way back: Tune's flat sampled point (``{"prune.kind": "heads", ...}``) as a :class:`TrialConfig`.

Plain dicts live only here, at Tune's boundary. Ray and Optuna are imported inside the functions that need
them, so ``import search.adapters`` stays cheap.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from common.config import show as _show
from common.errors import ConfigError
from search.space import DIMENSIONS, GATES, Choice, Fixed, Range, SearchSpace
from common.trial_config import TrialConfig

__all__ = ["build", "optuna_space", "to_trial_config", "trial_config"]


# --------------------------------------------------------------------------- Ray Tune

def _gate(space: SearchSpace, name: str):
    """``(parent, on)`` when ``name``'s parent can switch it off in this space, else ``None``."""
    if name not in GATES:
        return None
    parent, on = GATES[name]
    return None if set(space.options(parent)) <= on else (parent, on)


def _grid(rule, dim: Range) -> list:
    if rule.type is int:
        return list(range(dim.low, dim.high + 1, dim.step))
    points = round((dim.high - dim.low) / dim.step)
    # 12 significant digits keep 0.1 + 2 * 0.1 from printing as 0.30000000000000004
    return [float(f"{dim.low + k * dim.step:.12g}") for k in range(points + 1)]


def _domain(tune, rule, dim):
    if isinstance(dim, Choice):
        return tune.choice(list(dim.values))
    if rule.type is int:
        if dim.step not in (None, 1):
            # qrandint draws multiples of step, the same set as Optuna's low + k*step only if low is one
            if dim.low % dim.step == 0:
                return tune.qrandint(dim.low, dim.high, dim.step)
            return tune.choice(_grid(rule, dim))
        return (tune.lograndint if dim.log else tune.randint)(dim.low, dim.high + 1)  # Tune's high is exclusive
    if dim.step is not None:
        return tune.choice(_grid(rule, dim))
    return (tune.loguniform if dim.log else tune.uniform)(dim.low, dim.high)


def _lookup(spec, key: str):
    """``key``'s value in the config Tune is resolving; raises Tune's retry error while it is unresolved."""
    from ray.tune.search.sample import Domain
    from ray.tune.search.variant_generator import RecursiveDependencyError

    config = spec
    # Tune hands over {"config": {...}} (sometimes wrapped twice); a bare param_space works too
    while key not in config and isinstance(config.get("config"), dict):
        config = config["config"]
    value = config.get(key)
    if isinstance(value, Domain) or (isinstance(value, dict) and "grid_search" in value):
        raise RecursiveDependencyError(f"{key} is not sampled yet")
    return value


@dataclass(frozen=True)
class _Gated:
    """A ``tune.sample_from`` body: draw from ``domain`` when ``parent`` is on, else ``None``.

    Tune does not pass its seeded ``random_state`` to ``sample_from``, so gated knobs draw from
    NumPy's global generator: a seeded random search repeats everything but these.
    """

    parent: str
    on: frozenset
    domain: object

    def __call__(self, spec):
        return self.domain.sample() if _lookup(spec, self.parent) in self.on else None


def build(space: SearchSpace, *, grid: bool = False) -> dict:
    """A Ray Tune ``param_space`` with flat keys (``"prune.sparsity"``).

    A gated knob (sparsity when ``prune.kind`` may be none) becomes a ``tune.sample_from`` that
    yields ``None`` when its parent is off. ``grid=True`` turns ungated choices into
    ``tune.grid_search`` (see :func:`search.algorithms.param_space_for`).
    """
    from ray import tune

    out = {}
    for name, dim in space.dims:
        gate = _gate(space, name)
        if isinstance(dim, Fixed):
            out[name] = dim.value
        elif grid and gate is None and isinstance(dim, Choice):
            out[name] = tune.grid_search(list(dim.values))
        else:
            domain = _domain(tune, DIMENSIONS[name], dim)
            out[name] = tune.sample_from(_Gated(gate[0], gate[1], domain)) if gate else domain
    return out


# --------------------------------------------------------------------------- Optuna

@dataclass(frozen=True)
class _OptunaSpace:
    """Define-by-run space for ``OptunaSearch(space=...)``; a class, not a closure, so Tune can pickle it."""

    space: SearchSpace

    def __call__(self, trial) -> dict:
        chosen, fixed = {}, {}
        for name, dim in self.space.dims:
            parent, on = GATES.get(name, (None, None))
            if parent in chosen and chosen[parent] not in on:
                continue  # never suggested, so the sampler does not model a knob the trial ignores
            rule = DIMENSIONS[name]
            if isinstance(dim, Fixed):
                value = fixed[name] = dim.value
            elif isinstance(dim, Choice):
                value = trial.suggest_categorical(name, list(dim.values))
            elif rule.type is int:
                value = trial.suggest_int(name, dim.low, dim.high, step=dim.step or 1, log=dim.log)
            else:
                value = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
            chosen[name] = value
        return fixed


def optuna_space(space: SearchSpace) -> Callable:
    """``fn(trial) -> dict`` that suggests the searched knobs (gated ones only when their parent is on)
    and returns the fixed ones, for ``ray.tune.search.optuna.OptunaSearch(space=fn)``."""
    return _OptunaSpace(space)


# --------------------------------------------------------------------------- trial config

def to_trial_config(flat_params: dict) -> dict:
    """Tune's flat sampled config as the nested trial-config dict.

    Gated knobs whose parent is off are dropped (no ``prune.sparsity`` when ``prune.kind`` is none),
    as is ``lowrank`` when its ratio is 0; sections left empty are omitted.
    """
    if not isinstance(flat_params, dict):
        raise ConfigError(f"trial params: must be a flat mapping like {{'prune.kind': 'heads'}}, "
                          f"got {_show(flat_params)}")
    unknown = sorted((str(k) for k in flat_params if k not in DIMENSIONS))
    if unknown:
        raise ConfigError(f"trial params: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(DIMENSIONS)}")
    out: dict = {}
    for name in DIMENSIONS:
        if name not in flat_params:
            continue
        parent, on = GATES.get(name, (None, None))
        if parent is not None and flat_params.get(parent) not in on:
            continue
        value = flat_params[name]
        if name == "lowrank.ratio" and value == DIMENSIONS[name].off:
            continue
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):
            value = value.item()  # a NumPy scalar from a sampler: keep the config JSON-ready
        section, key = name.split(".")
        out.setdefault(section, {})[key] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def trial_config(flat_params: dict, base: TrialConfig | None = None) -> TrialConfig:
    """Tune's flat sampled point on top of ``base`` (the job's train and distill defaults), validated; raises
    ConfigError naming every bad field."""
    base_dict = (base or TrialConfig()).model_dump(mode="json", exclude_none=True)
    return TrialConfig.model_validate(_merge(base_dict, to_trial_config(flat_params)))
