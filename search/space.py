"""The search space: which trial-config knobs a job searches, and over what.

Parsed from the ``search:`` section of a job YAML, nested by section::

    {"prune": {"kind": ["none", "heads"], "sparsity": {"low": 0.2, "high": 0.7}},
     "train": {"lr": {"low": 1e-5, "high": 1e-3, "log": True}}}

Each dimension is a fixed value, a list of choices or a range, and feeds the trial-config key of
the same name (``prune.sparsity`` -> ``{"prune": {"sparsity": ...}}``). What a knob may be (its type,
bounds or choices) is read from the field of the same name in :mod:`common.trial_config`, so a bound is
written once. The Tune and Optuna adapters live in :mod:`search.adapters`.
"""
from __future__ import annotations

import math
import numbers
import types
import typing
from dataclasses import dataclass
from typing import Callable, ClassVar, Literal

from pydantic import model_serializer, model_validator

from common.config import Frozen, Problems
from common.config import show as _show
from common.errors import SpecError
from common.trial_config import (DistillConfig, LowRankConfig, PruneConfig, QuantConfig, StudentConfig, TrainConfig,
                             VocabConfig)

__all__ = ["Fixed", "Choice", "Range", "SearchSpace", "DIMENSIONS", "SECTIONS", "GATES"]

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
    type: type  # int, float, str or bool
    allowed: str  # how the error message says what a value may be
    ok: Callable[[object], bool]
    ranged: bool = True
    off: object = None  # a value that switches the knob off; it may not bound a range


def _members(union) -> list:
    return list(typing.get_args(typing.get_args(union)[0]))


# Which config models a search section feeds, and the field that tags a union member.
_MODELS = {"student": [StudentConfig], "prune": _members(PruneConfig), "quant": _members(QuantConfig),
           "lowrank": [LowRankConfig], "vocab": [VocabConfig], "distill": [DistillConfig], "train": [TrainConfig]}
_TAGS = {"prune": "kind", "quant": "mode"}
# What may be searched. The order matters: a gating parent comes before the knobs it gates (Optuna samples
# in this order).
_SEARCHED = ("student.layers", "student.layer_choice", "student.hidden", "student.heads", "student.ffn",
             "prune.kind", "prune.sparsity", "prune.importance", "quant.mode", "quant.group_size",
             "quant.embedding_bits", "lowrank.ratio", "vocab.prune", "distill.temperature", "distill.alpha",
             "distill.hidden_weight", "distill.attention_weight", "train.lr", "train.epochs")
_OFF = {"lowrank.ratio": 0.0}  # a ratio of 0 is how a space says "no low-rank factorization" (TrialConfig reads it)


def _tag(model, key: str) -> str:
    return typing.get_args(model.model_fields[key].annotation)[0]


def _base(annotation):
    """The one type a field holds, Optional and Annotated peeled off."""
    while True:
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        else:
            return annotation


def _bounds(metadata) -> tuple:
    """(low, low inclusive, high, high inclusive) from a field's pydantic constraints; None where unbounded."""
    low = high = None
    low_in = high_in = True
    for m in metadata:
        if getattr(m, "ge", None) is not None:
            low, low_in = m.ge, True
        if getattr(m, "gt", None) is not None:
            low, low_in = m.gt, False
        if getattr(m, "le", None) is not None:
            high, high_in = m.le, True
        if getattr(m, "lt", None) is not None:
            high, high_in = m.lt, False
    return low, low_in, high, high_in


def _num(x) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _numeric(kind: type, metadata, off) -> _Rule:
    low, low_in, high, high_in = _bounds(metadata)
    noun = "an integer" if kind is int else "a number"
    if low is not None and high is not None:
        allowed = f"{noun} in {'[' if low_in else '('}{_num(low)}, {_num(high)}{']' if high_in else ')'}"
    elif low is not None:
        allowed = f"{noun} {'≥' if low_in else '>'} {_num(low)}"
    else:
        allowed = noun

    def ok(v) -> bool:
        if low is not None and not (v >= low if low_in else v > low):
            return False
        return high is None or (v <= high if high_in else v < high)

    if off is not None:
        return _Rule(kind, f"{allowed}, or {_num(off)} for off", lambda v: v == off or ok(v), off=off)
    return _Rule(kind, allowed, ok)


def _choices(options: tuple) -> _Rule:
    kind = int if all(isinstance(o, int) for o in options) else str
    return _Rule(kind, "one of " + "|".join(map(str, options)), lambda v: v in options, ranged=False)


def _rule(name: str) -> _Rule:
    section, key = name.split(".")
    models = _MODELS[section]
    if _TAGS.get(section) == key:
        return _choices(("none", *(_tag(m, key) for m in models)))
    field = next(m.model_fields[key] for m in models if key in m.model_fields)
    kind = _base(field.annotation)
    if typing.get_origin(kind) is Literal:
        return _choices(typing.get_args(kind))
    if kind is str:
        return _Rule(str, "a string", lambda v: True, ranged=False)
    if kind is bool:
        return _Rule(bool, "true or false", lambda v: True, ranged=False)
    return _numeric(kind, field.metadata, _OFF.get(name))


DIMENSIONS: dict[str, _Rule] = {name: _rule(name) for name in _SEARCHED}
SECTIONS: dict[str, tuple[str, ...]] = {
    section: tuple(n.split(".")[1] for n in DIMENSIONS if n.startswith(section + "."))
    for section in dict.fromkeys(n.split(".")[0] for n in DIMENSIONS)
}


def _gates() -> dict[str, tuple[str, frozenset]]:
    # A knob that only some union members have (importance: not UnstructuredPrune; group_size: int4 and mixed)
    # only matters for those: sampling it otherwise spends the searcher's budget on something the trial ignores.
    out = {}
    for name in DIMENSIONS:
        section, key = name.split(".")
        tag = _TAGS.get(section)
        if tag and key != tag:
            on = frozenset(_tag(m, tag) for m in _MODELS[section] if key in m.model_fields)
            out[name] = (f"{section}.{tag}", on)
    return out


GATES: dict[str, tuple[str, frozenset]] = _gates()

_BAD = object()


def _value(rule: _Rule, raw, path: str, problems: list):
    """``raw`` checked and normalised (ints to float for float knobs), or ``_BAD`` after noting why."""
    value = raw
    if rule.type is str:
        good = isinstance(raw, str) and rule.ok(raw)
    elif rule.type is bool:
        good = isinstance(raw, bool)
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


def _parse(d) -> tuple[dict, list]:
    """The dimensions of a ``search:`` YAML section, and every problem with it."""
    if d is None:
        return {}, []
    if not isinstance(d, dict):
        return {}, [f"search: must be a mapping of sections ({', '.join(SECTIONS)}), got {_show(d)}"]
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
                problems.append(f"search.{section}.{key}: unknown key; allowed: {', '.join(SECTIONS[section])}")
                continue
            name = f"{section}.{key}"
            given.add(name)
            dim = _dim(name, body[key], f"search.{name}", problems)
            if dim is not None:
                dims[name] = dim
    return dims, problems + _gate_problems(dims, given)


def _check_dims(pairs) -> tuple[dict, list]:
    """Dimensions given as objects (``SearchSpace(dims=...)``), checked as if they had been written in YAML."""
    try:
        pairs = list(dict(pairs).items())
    except (TypeError, ValueError):
        return {}, [f"search: dims must be (name, dimension) pairs, got {_show(pairs)}"]
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
    return dims, problems + _gate_problems(dims, {n for n, _ in pairs})


def _relative(line: str) -> tuple[str, str]:
    """``search.prune.sparsity: msg`` as (``prune.sparsity``, msg): the space's own problems, below its path."""
    head, _, msg = line.partition(": ")
    return head.removeprefix("search").lstrip("."), msg


def _schema(rule: _Rule, description: str) -> dict:
    scalar = {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}[rule.type]}
    forms = [scalar, {"type": "array", "items": scalar, "minItems": 1}]
    if rule.ranged:
        forms.append({"type": "object", "additionalProperties": False, "required": ["low", "high"],
                      "properties": {"low": scalar, "high": scalar, "log": {"type": "boolean", "default": False},
                                     "step": scalar}})
    return {"anyOf": forms, "description": f"{description}: {rule.allowed}" if description else rule.allowed}


_WARM_START_DOC = ("seed the searcher with the finished trials of earlier jobs: auto (every job in the store with "
                   "the same teacher and task) or a list of job ids; trials whose config lies outside this space "
                   "are skipped and none runs again. tpe and nsga2 learn from them; random and grid only record "
                   "the sources")


def _warm_start(raw) -> tuple:
    """(``search.warm_start`` normalised, or None; a problem line or None)."""
    if raw is None or raw == "auto":
        return raw, None
    if isinstance(raw, (list, tuple)) and raw and all(isinstance(j, str) and j.strip() for j in raw):
        if len(set(raw)) < len(raw):
            return None, f"search.warm_start: lists a job twice, got {_show(raw)}; list each job id once"
        return tuple(raw), None
    return None, f"search.warm_start: must be auto or a list of job ids, got {_show(raw)}"


class SearchSpace(Frozen):
    """The searched dimensions: ``dims`` pairs a flat name (``"prune.sparsity"``) with its dimension, in
    sampling order. Built from the YAML form (``SearchSpace.model_validate({"prune": {...}})``) or from
    ``dims``; ``model_dump(mode="json")`` gives the YAML form back."""

    _prefix: ClassVar[str] = "search"
    _error: ClassVar[type] = SpecError

    dims: tuple[tuple[str, Fixed | Choice | Range], ...] = ()
    # earlier jobs whose finished trials seed the searcher: "auto" (every job with the same teacher and task)
    # or their ids; see search.warmstart
    warm_start: Literal["auto"] | tuple[str, ...] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, data):
        if isinstance(data, SearchSpace):
            return data
        warm = None
        if isinstance(data, dict) and "warm_start" in data:
            data = dict(data)
            warm = data.pop("warm_start")
        if isinstance(data, dict) and data and set(data) == {"dims"}:
            dims, problems = _check_dims(data["dims"])
        else:
            dims, problems = _parse(data)
        warm, warm_problem = _warm_start(warm)
        problems += [warm_problem] if warm_problem else []
        if problems:
            raise Problems(*map(_relative, problems))
        return {"dims": tuple((n, dims[n]) for n in DIMENSIONS if n in dims), "warm_start": warm}

    @model_serializer
    def _to_yaml(self) -> dict:
        out: dict = {}
        for name, dim in self.dims:
            section, key = name.split(".")
            out.setdefault(section, {})[key] = _raw(dim)
        if self.warm_start is not None:
            out["warm_start"] = self.warm_start if self.warm_start == "auto" else list(self.warm_start)
        return out

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler) -> dict:
        # the YAML form, with each knob's type and bounds as its config model declares them
        sections = {}
        for section, keys in SECTIONS.items():
            props = {}
            for key in keys:
                models = _MODELS[section]
                field = next((m.model_fields[key] for m in models if key in m.model_fields), None)
                props[key] = _schema(DIMENSIONS[f"{section}.{key}"], (field.description or "") if field else "")
            sections[section] = {"type": "object", "additionalProperties": False, "properties": props}
        warm = {"anyOf": [{"const": "auto"}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                              "minItems": 1}, {"type": "null"}], "default": None,
                "description": _WARM_START_DOC}
        return {"type": "object", "title": "SearchSpace", "additionalProperties": False,
                "properties": {**sections, "warm_start": warm},
                "description": "Each knob: one value, a list of choices, or a range {low, high, log, step}."}

    def get(self, name: str):
        """The dimension called ``name`` (``"prune.sparsity"``), or ``None`` if it is not searched."""
        return dict(self.dims).get(name)

    def options(self, name: str) -> tuple:
        """The values a categorical dimension can take (``()`` when it is not searched)."""
        dim = self.get(name)
        return () if dim is None else _options(dim)
