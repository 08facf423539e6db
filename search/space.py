"""The search space: which trial-config knobs a job searches, and over what.

Parsed from the ``search:`` section of a job YAML, nested by section::

    {"prune": {"kind": ["none", "heads"], "sparsity": {"low": 0.2, "high": 0.7}},
     "train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}}}

Each dimension is a fixed value, a list of choices or a range, and feeds the trial-config key of
the same name (``prune.sparsity`` -> ``{"prune": {"sparsity": ...}}``). Ray and Optuna are imported
only inside :func:`build` and the Optuna sampling callable, so ``import search.space`` stays cheap.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

from common.errors import ConfigError, SpecError

__all__ = ["Fixed", "Choice", "Range", "SearchSpace", "DIMENSIONS", "GATES", "build", "optuna_space",
           "to_trial_config"]

PRUNE_KINDS = ("none", "unstructured", "heads", "ffn", "structured")
QUANT_MODES = ("none", "dynamic", "static", "qat", "int4", "mixed")
GROUP_SIZES = (16, 32, 64, 128, 256)  # what workers' int4 packing supports
MAX_GRID = 10_000  # a stepped range is enumerated; past this many points the step is surely a typo


@dataclass(frozen=True)
class Fixed:
    """One value used by every trial."""

    value: object


@dataclass(frozen=True)
class Choice:
    """A categorical dimension: one of ``values``."""

    values: tuple


@dataclass(frozen=True)
class Range:
    """Numbers in ``[low, high]``; ``log`` samples evenly in log space, ``step`` keeps ``low + k*step``."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass(frozen=True)
class _Rule:
    type: type  # int, float or str
    allowed: str  # how the error message says what a value may be
    ok: Callable[[object], bool]
    ranged: bool = True
    off: object = None  # a value that switches the knob off; it may not bound a range


def _cat(options: tuple) -> _Rule:
    return _Rule(str, "one of " + "|".join(options), lambda v: v in options, ranged=False)


def _count() -> _Rule:
    # the cap only keeps samplers' integer arithmetic sane; no student comes near it
    return _Rule(int, "an integer in [1, 1000000]", lambda v: 1 <= v <= 1_000_000)


# The order matters: a gating parent comes before the knobs it gates (Optuna samples in this order).
DIMENSIONS: dict[str, _Rule] = {
    "student.layers": _count(),
    "student.layer_choice": _cat(("uniform", "bottom", "top")),
    "student.hidden": _count(),
    "student.heads": _count(),
    "student.ffn": _count(),
    "prune.kind": _cat(PRUNE_KINDS),
    "prune.sparsity": _Rule(float, "a number in [0, 1)", lambda v: 0 <= v < 1),
    "prune.importance": _cat(("gradient", "magnitude")),
    "quant.mode": _cat(QUANT_MODES),
    "quant.group_size": _Rule(int, "one of " + "|".join(map(str, GROUP_SIZES)), lambda v: v in GROUP_SIZES,
                              ranged=False),
    # the word embeddings are half of a MiniLM: an 8x smaller model needs them in 4 bits
    "quant.embedding_bits": _Rule(int, "one of 4|8", lambda v: v in (4, 8), ranged=False),
    "lowrank.ratio": _Rule(float, "a number in (0, 1], or 0 for off", lambda v: 0 <= v <= 1, off=0.0),
    "distill.temperature": _Rule(float, "a number in (0, 50]", lambda v: 0 < v <= 50),
    "distill.alpha": _Rule(float, "a number in [0, 1]", lambda v: 0 <= v <= 1),
    "distill.hidden_weight": _Rule(float, "a number ≥ 0", lambda v: v >= 0),
    "distill.attention_weight": _Rule(float, "a number ≥ 0", lambda v: v >= 0),
    "train.lr": _Rule(float, "a number in (0, 1)", lambda v: 0 < v < 1),
    "train.epochs": _Rule(float, "a number > 0", lambda v: v > 0),
}
SECTIONS: dict[str, tuple[str, ...]] = {
    section: tuple(n.split(".")[1] for n in DIMENSIONS if n.startswith(section + "."))
    for section in dict.fromkeys(n.split(".")[0] for n in DIMENSIONS)
}

# A knob that only matters for some values of its parent: sampling it otherwise spends the searcher's
# budget on something the trial ignores. Unstructured pruning ranks weights by magnitude only, so
# importance is for the structured kinds (workers.configs.UnstructuredPrune has no such field).
GATES: dict[str, tuple[str, frozenset]] = {
    "prune.sparsity": ("prune.kind", frozenset(PRUNE_KINDS) - {"none"}),
    "prune.importance": ("prune.kind", frozenset({"heads", "ffn", "structured"})),
    "quant.group_size": ("quant.mode", frozenset({"int4"})),
    "quant.embedding_bits": ("quant.mode", frozenset(QUANT_MODES) - {"none"}),
}

_BAD = object()


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _value(rule: _Rule, raw, path: str, problems: list):
    """``raw`` checked and normalised (ints to float for float knobs), or ``_BAD`` after noting why."""
    value = raw
    if rule.type is str:
        good = isinstance(raw, str) and rule.ok(raw)
    elif rule.type is int:
        good = isinstance(raw, int) and not isinstance(raw, bool) and rule.ok(raw)
    else:
        good = isinstance(raw, numbers.Real) and not isinstance(raw, bool)
        try:
            value = float(raw) if good else raw
        except OverflowError:
            good = False
        good = good and math.isfinite(value) and rule.ok(value)
    if not good:
        problems.append(f"{path}: must be {rule.allowed}, got {_show(raw)}")
        return _BAD
    return int(value) if rule.type is int else value


def _range(rule: _Rule, raw: dict, path: str, problems: list):
    unknown = [k for k in raw if k not in ("low", "high", "log", "step")]
    if unknown:
        problems.append(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))} in a range; "
                        "allowed: low, high, log, step")
    n = len(problems)
    for key in ("low", "high"):
        if key not in raw:
            problems.append(f"{path}.{key}: missing; a range needs low and high")
    low = _value(rule, raw["low"], f"{path}.low", problems) if "low" in raw else _BAD
    high = _value(rule, raw["high"], f"{path}.high", problems) if "high" in raw else _BAD
    log = raw.get("log", False)
    if not isinstance(log, bool):
        problems.append(f"{path}.log: must be true or false, got {_show(log)}")
    step = raw.get("step")
    if step is not None:
        step = _value(_Rule(rule.type, "an integer ≥ 1" if rule.type is int else "a number > 0", lambda v: v > 0),
                      step, f"{path}.step", problems)
    if len(problems) > n:
        return None
    for key, v in (("low", low), ("high", high)):
        if rule.off is not None and v == rule.off:
            problems.append(f"{path}.{key}: {v} means off and cannot bound a range; "
                            f"list it as a choice instead, e.g. [{v}, 0.25, 0.5]")
    if not low < high:
        problems.append(f"{path}.high: must be > low ({low}), got {high}; use a single value to fix it")
    if log and low <= 0:
        problems.append(f"{path}.low: must be > 0 when log is true, got {low}")
    if log and step is not None:
        problems.append(f"{path}: log and step cannot be combined (Optuna refuses it); drop one")
    if step is not None and low < high:
        points = (high - low) // step if rule.type is int else (high - low) / step
        if points > MAX_GRID:
            problems.append(f"{path}.step: {step} makes over {MAX_GRID} points; use a larger step or none")
        elif ((high - low) % step != 0 if rule.type is int
              else abs(points - round(points)) > 1e-9 * max(1.0, points)):
            problems.append(f"{path}.step: high - low ({high} - {low}) must be a multiple of step ({step})")
    if len(problems) > n:
        return None
    return Range(low, high, log, step)


def _dim(name: str, raw, path: str, problems: list):
    """Parse one dimension as written in YAML; ``None`` after noting every problem."""
    rule = DIMENSIONS[name]
    if isinstance(raw, dict):
        if not rule.ranged:
            problems.append(f"{path}: must be {rule.allowed} or a list of them, not a range")
            return None
        return _range(rule, raw, path, problems)
    if isinstance(raw, (list, tuple)):
        if not raw:
            problems.append(f"{path}: empty list; give at least one value, each {rule.allowed}")
            return None
        n = len(problems)
        values = [_value(rule, v, f"{path}[{i}]", problems) for i, v in enumerate(raw)]
        if len(problems) > n:
            return None
        for i, v in enumerate(values):
            if v in values[:i]:
                problems.append(f"{path}[{i}]: {_show(v)} is listed twice; list each choice once")
                return None
        return Choice(tuple(values))
    if raw is None:
        problems.append(f"{path}: empty; give a value, a list of choices or a range, or drop the key")
        return None
    value = _value(rule, raw, path, problems)
    return None if value is _BAD else Fixed(value)


def _raw(dim):
    """The YAML form of a dimension (what :func:`_dim` parses back)."""
    if isinstance(dim, Fixed):
        return dim.value
    if isinstance(dim, Choice):  # anything but a sequence parses back as a Fixed, and is refused
        return list(dim.values) if isinstance(dim.values, (list, tuple)) else dim.values
    out = {"low": dim.low, "high": dim.high, "log": dim.log}
    return out if dim.step is None else {**out, "step": dim.step}


def _options(dim) -> tuple:
    return (dim.value,) if isinstance(dim, Fixed) else dim.values


def _gate_problems(dims: dict, given: set) -> list:
    problems = []
    for child, (parent, on) in GATES.items():
        if child not in dims:
            continue
        allowed = "|".join(sorted(on))
        if parent not in given:
            problems.append(f"search.{child}: needs search.{parent}, since it only matters when that is "
                            f"one of {allowed}")
        elif parent in dims and not set(_options(dims[parent])) & on:
            problems.append(f"search.{child}: never used, since search.{parent} is never one of {allowed}; "
                            f"drop it or add one of those to search.{parent}")
    return problems


@dataclass(frozen=True)
class SearchSpace:
    """The searched dimensions: ``dims`` pairs a flat name (``"prune.sparsity"``) with its dimension."""

    dims: tuple[tuple[str, Fixed | Choice | Range], ...] = ()

    def __post_init__(self):
        try:
            pairs = list(dict(self.dims).items())
        except (TypeError, ValueError):
            raise SpecError([f"search: dims must be (name, dimension) pairs, got {_show(self.dims)}"]) from None
        problems, dims = [], {}
        for name, dim in pairs:
            path = f"search.{name}"
            if name not in DIMENSIONS:
                problems.append(f"{path}: unknown dimension; allowed: {', '.join(DIMENSIONS)}")
            elif not isinstance(dim, (Fixed, Choice, Range)):
                problems.append(f"{path}: must be a Fixed, Choice or Range, got {_show(dim)}")
            else:
                parsed = _dim(name, _raw(dim), path, problems)
                if parsed is not None and type(parsed) is not type(dim):  # e.g. Fixed([1, 2])
                    problems.append(f"{path}: {_show(dim)} must be a {type(parsed).__name__}")
                elif parsed is not None:
                    dims[name] = parsed
        problems += _gate_problems(dims, {n for n, _ in pairs})
        if problems:
            raise SpecError(problems)
        object.__setattr__(self, "dims", tuple((n, dims[n]) for n in DIMENSIONS if n in dims))

    def get(self, name: str):
        """The dimension called ``name`` (``"prune.sparsity"``), or ``None`` if it is not searched."""
        return dict(self.dims).get(name)

    @classmethod
    def from_dict(cls, d) -> "SearchSpace":
        """Parse the ``search:`` YAML section; raises SpecError listing every problem."""
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise SpecError([f"search: must be a mapping of sections ({', '.join(SECTIONS)}), got {_show(d)}"])
        problems, dims, given = [], {}, set()
        for section in sorted(d, key=str):
            body = d[section]
            if section not in SECTIONS:
                problems.append(f"search.{section}: unknown section; allowed: {', '.join(SECTIONS)}")
                continue
            if body is None:  # a YAML section with every knob commented out
                continue
            if not isinstance(body, dict):
                problems.append(f"search.{section}: must be a mapping of {', '.join(SECTIONS[section])}, "
                                f"got {_show(body)}")
                continue
            for key in sorted(body, key=str):
                if key not in SECTIONS[section]:
                    problems.append(f"search.{section}.{key}: unknown key; allowed: "
                                    f"{', '.join(SECTIONS[section])}")
                    continue
                name = f"{section}.{key}"
                given.add(name)
                dim = _dim(name, body[key], f"search.{name}", problems)
                if dim is not None:
                    dims[name] = dim
        problems += _gate_problems(dims, given)
        if problems:
            raise SpecError(problems)
        return cls(tuple(dims.items()))

    def to_dict(self) -> dict:
        """The YAML/JSON form; ``from_dict(to_dict())`` gives an equal space."""
        out: dict = {}
        for name, dim in self.dims:
            section, key = name.split(".")
            out.setdefault(section, {})[key] = _raw(dim)
        return out


# --------------------------------------------------------------------------- Ray Tune

def _gate(space: SearchSpace, name: str):
    """``(parent, on)`` when ``name``'s parent can switch it off in this space, else ``None``."""
    if name not in GATES:
        return None
    parent, on = GATES[name]
    return None if set(_options(space.get(parent))) <= on else (parent, on)


def _grid(rule: _Rule, dim: Range) -> list:
    if rule.type is int:
        return list(range(dim.low, dim.high + 1, dim.step))
    points = round((dim.high - dim.low) / dim.step)
    # 12 significant digits keep 0.1 + 2 * 0.1 from printing as 0.30000000000000004
    return [float(f"{dim.low + k * dim.step:.12g}") for k in range(points + 1)]


def _domain(tune, rule: _Rule, dim):
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
