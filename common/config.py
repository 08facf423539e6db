"""The base of every slimray config: a frozen pydantic model whose errors read as one line per problem.

pydantic reports every bad field at once; :func:`problems` turns its report into lines like
``train.lr: must be < 1, got 5`` (a discriminated union's tag is not part of the path: ``prune.sparsity``,
not ``prune.heads.sparsity``), and a :class:`Frozen` model raises them as a :class:`ConfigError` (or
:class:`SpecError`), so a user never sees a pydantic traceback.
"""
from __future__ import annotations

import types
import typing
from typing import Annotated, ClassVar

from pydantic import AllowInfNan, BaseModel, ConfigDict, Strict, StrictBool, StrictInt, StrictStr, ValidationError

from common.errors import ConfigError, SpecError

__all__ = ["Frozen", "Problems", "Float", "Int", "Bool", "Str", "problems", "error_of", "show"]

# Strict scalars: YAML's `true` is not the number 1 and "0.5" is not a number; ints are fine where floats go.
Float = Annotated[float, Strict(), AllowInfNan(False)]
Int = StrictInt
Bool = StrictBool
Str = StrictStr


class Frozen(BaseModel):
    """Immutable, and a key it does not know is an error. Building one (``Model(...)``, ``model_validate``)
    raises ``_error`` listing every problem, each path under ``_prefix`` (the model's place in a job spec)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    _prefix: ClassVar[str] = ""
    _error: ClassVar[type[ConfigError]] = ConfigError

    def __init__(self, /, **data):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise error_of(err, type(self)) from None

    # only the outermost model converts: nested ones are validated from the schema, as pydantic's own init does
    __init__.__pydantic_base_init__ = True

    @classmethod
    def model_validate(cls, obj, **kwargs):
        try:
            return super().model_validate(obj, **kwargs)
        except ValidationError as err:
            raise error_of(err, cls) from None

    @classmethod
    def model_validate_json(cls, data, **kwargs):
        try:
            return super().model_validate_json(data, **kwargs)
        except ValidationError as err:
            raise error_of(err, cls) from None


class Problems(ValueError):
    """Raised by a validator that found problems below its model: ``(path, message)`` pairs, the path
    relative to the model (``"hidden"``, ``"low"``, ``"[1]"``, or ``""`` for the model itself)."""

    def __init__(self, *problems: tuple[str, str]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" if p else m for p, m in problems))


def show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _join(path: str, part: str) -> str:
    if not part:
        return path
    if not path or part.startswith("["):
        return path + part
    return f"{path}.{part}"


def _unwrap(tp) -> tuple[list, str | None]:
    """The alternatives of an annotation (Optional/Union/Annotated flattened) and its discriminator, if any."""
    discriminator = None
    if typing.get_origin(tp) is Annotated:
        args = typing.get_args(tp)
        for meta in args[1:]:
            discriminator = discriminator or getattr(meta, "discriminator", None)
        tp = args[0]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(tp):
            inner, d = _unwrap(arg)
            out += inner
            discriminator = discriminator or d
        return out, discriminator
    return [tp], discriminator


def _models(tps) -> list[type[BaseModel]]:
    return [t for t in tps if isinstance(t, type) and issubclass(t, BaseModel)]


def _items(tps) -> list:
    """What a list/tuple/dict among ``tps`` holds."""
    out = []
    for t in tps:
        args = [a for a in typing.get_args(t) if a is not Ellipsis]
        if typing.get_origin(t) in (list, tuple, set, frozenset) and args:
            out += _unwrap(args[0])[0]
        elif typing.get_origin(t) is dict and len(args) == 2:
            out += _unwrap(args[1])[0]
    return out


def _walk(model, loc) -> tuple[str, list]:
    """(the user-facing path of ``loc``, the types at its end)."""
    path, tps, discriminator = "", [model], None
    for item in loc:
        if discriminator is not None:  # a tag names the member, not a place
            tagged = [m for m in _models(tps) if _tag(m, discriminator) == item]
            if tagged:
                tps, discriminator = tagged, None
                continue
        discriminator = None
        if isinstance(item, int):
            path, tps = _join(path, f"[{item}]"), _items(tps)
            continue
        path = _join(path, str(item))
        fields = [m.model_fields[item] for m in _models(tps) if item in m.model_fields]
        if fields:
            tps, discriminator = _unwrap(fields[0].annotation)
            discriminator = discriminator or fields[0].discriminator
        else:
            tps = _items(tps)
    return path, tps


def _tag(model: type[BaseModel], key: str):
    field = model.model_fields.get(key)
    args = typing.get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 else None


def _choices(expected: str) -> str:
    """pydantic's "'a', 'b' or 'c'" as a|b|c."""
    parts = expected.replace(" or ", ", ").split(", ")
    return "|".join(p.strip().strip("'") for p in parts)


_TYPES = {
    "int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer",
    "float_type": "a number", "float_parsing": "a number", "finite_number": "a finite number",
    "bool_type": "true or false", "bool_parsing": "true or false", "string_type": "a string",
    "model_type": "a mapping", "model_attributes_type": "a mapping", "dict_type": "a mapping",
    "tuple_type": "a list", "list_type": "a list", "none_required": "null",
}
_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", "≥"), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "≤")}


def _lines(e: dict, model) -> list[tuple[str, str]]:
    kind, ctx, loc = e["type"], e.get("ctx") or {}, e["loc"]
    path, tps = _walk(model, loc)
    got = f", got {show(e.get('input'))}"
    if kind == "value_error" and isinstance(ctx.get("error"), Problems):
        return [(_join(path, p), m) for p, m in ctx["error"].problems]
    if kind in ("value_error", "assertion_error"):
        return [(path, str(ctx.get("error", e["msg"])))]
    if kind == "missing":
        return [(path, "missing; it is required")]
    if kind == "extra_forbidden":
        owners = _models(_walk(model, loc[:-1])[1])
        allowed = sorted({f for m in owners for f in m.model_fields})
        return [(path, "unknown key" + (f"; allowed: {', '.join(allowed)}" if allowed else ""))]
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        key = ctx.get("discriminator", "").strip("'")
        tags = [_tag(m, key) for m in _models(tps)]
        allowed = "|".join(["none", *map(str, tags)]) if tags else _choices(ctx.get("expected_tags", ""))
        if kind == "union_tag_not_found":
            return [(_join(path, key), f"missing; one of {allowed}")]
        return [(_join(path, key), f"must be one of {allowed}, got {show(ctx.get('tag'))}")]
    if kind == "literal_error":
        return [(path, f"must be one of {_choices(ctx['expected'])}{got}")]
    if kind in _BOUNDS:
        key, sign = _BOUNDS[kind]
        return [(path, f"must be {sign} {ctx[key]:g}{got}" if isinstance(ctx[key], (int, float))
                 else f"must be {sign} {ctx[key]}{got}")]
    if kind in _TYPES:
        return [(path, f"must be {_TYPES[kind]}{got}")]
    if kind == "string_too_short":
        return [(path, f"must not be empty{got}" if ctx.get("min_length") == 1
                 else f"must have at least {ctx.get('min_length')} characters{got}")]
    if kind in ("too_short", "too_long"):
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        what = "at least" if kind == "too_short" else "at most"
        return [(path, f"must have {what} {bound} item(s){got}")]
    msg = e["msg"]
    return [(path, (msg[:1].lower() + msg[1:]) + got)]


def problems(err: ValidationError, model, prefix: str = "") -> list[str]:
    """One line per problem of ``err`` (raised validating ``model``), paths under ``prefix``."""
    out = []
    for e in err.errors(include_url=False):
        for path, msg in _lines(e, model):
            full = _join(prefix, path)
            line = f"{full}: {msg}" if full else msg
            if line not in out:
                out.append(line)
    return out


def error_of(err: ValidationError, model, *, error: type[ConfigError] | None = None, prefix: str | None = None):
    """``err`` as ``error`` (default: the model's own), one line per problem; the lines are its ``problems``."""
    error = error or getattr(model, "_error", ConfigError)
    lines = problems(err, model, getattr(model, "_prefix", "") if prefix is None else prefix)
    if issubclass(error, SpecError):
        return error(lines)
    exc = error(lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines))
    exc.problems = lines
    return exc
