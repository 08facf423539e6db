"""Typed, validated trial configs: one frozen dataclass per concept.

Behaviour is chosen by the *type* of a config (``HeadPrune`` vs ``UnstructuredPrune``),
never by a string deep inside model code. Every config validates in ``__post_init__``,
names the offending field in its error, and round-trips through JSON via
``to_dict`` / ``from_dict`` (the tagged unions carry a ``kind`` key).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from common.errors import ConfigError

__all__ = [
    "StudentConfig", "UnstructuredPrune", "HeadPrune", "FfnPrune", "StructuredPrune", "PruneConfig",
    "DynamicInt8", "StaticInt8", "QatInt8", "Int4WeightOnly", "MixedPrecision", "QuantConfig",
    "LowRankConfig", "DistillConfig", "TrainConfig", "TrialConfig", "to_dict", "from_dict",
]


def _check(ok: bool, path: str, allowed: str, got) -> None:
    if not ok:
        raise ConfigError(f"{path}: must be {allowed}, got {got!r}")


def _choice(value, path: str, options: tuple) -> None:
    _check(value in options, path, "one of " + "|".join(map(str, options)), value)


def _unit(value, path: str, *, closed_high: bool = False, open_low: bool = False) -> None:
    lo = "(0" if open_low else "[0"
    hi = "1]" if closed_high else "1)"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (value > 0 if open_low else value >= 0) and (value <= 1 if closed_high else value < 1)
    _check(ok, path, f"a number in {lo}, {hi}", value)


def _positive_int(value, path: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, path, "a positive integer", value)


def _non_negative(value, path: str) -> None:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0, path, "a number ≥ 0", value)


# --------------------------------------------------------------------------- student

@dataclass(frozen=True)
class StudentConfig:
    """Student shape. ``None`` keeps the teacher's value."""

    layers: int | None = None
    layer_choice: str = "uniform"  # which teacher layers to keep: spread evenly, the bottom k or the top k
    hidden: int | None = None
    heads: int | None = None
    ffn: int | None = None

    def __post_init__(self):
        for name in ("layers", "hidden", "heads", "ffn"):
            _positive_int(getattr(self, name), f"student.{name}", allow_none=True)
        _choice(self.layer_choice, "student.layer_choice", ("uniform", "bottom", "top"))
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise ConfigError(f"student.hidden: must be divisible by student.heads ({self.heads}), got {self.hidden}")


# --------------------------------------------------------------------------- pruning

@dataclass(frozen=True)
class UnstructuredPrune:
    """Magnitude pruning of Linear weights to ``sparsity``, ramped by the cubic schedule
    s_t = s_f + (s_i - s_f)(1 - t/T)^3 (Zhu & Gupta, 2017) during distillation."""

    sparsity: float = 0.5
    scope: str = "global"  # rank weights over all layers, or per layer
    initial_sparsity: float = 0.0
    schedule: str = "cubic"  # cubic ramp or oneshot at the start
    end_fraction: float = 0.75  # the ramp reaches the final sparsity at this share of training

    def __post_init__(self):
        _unit(self.sparsity, "prune.sparsity")
        _unit(self.initial_sparsity, "prune.initial_sparsity")
        _check(self.initial_sparsity <= self.sparsity, "prune.initial_sparsity",
               f"≤ prune.sparsity ({self.sparsity})", self.initial_sparsity)
        _choice(self.scope, "prune.scope", ("global", "layer"))
        _choice(self.schedule, "prune.schedule", ("cubic", "oneshot"))
        _unit(self.end_fraction, "prune.end_fraction", closed_high=True, open_low=True)


@dataclass(frozen=True)
class HeadPrune:
    """Remove ``sparsity`` of all attention heads (ranked globally by importance; every layer keeps ≥ 1)."""

    sparsity: float = 0.5
    importance: str = "gradient"  # Michel et al. 2019 gradient importance, or weight magnitude
    heads: tuple[int, ...] | None = None  # explicit heads to keep per layer (overrides sparsity)
    samples: int = 256  # training rows whose gradients rank the heads (gradient importance)

    def __post_init__(self):
        _unit(self.sparsity, "prune.sparsity")
        _choice(self.importance, "prune.importance", ("gradient", "magnitude"))
        _positive_int(self.samples, "prune.samples")
        if self.heads is not None:
            object.__setattr__(self, "heads", tuple(self.heads))
            for i, h in enumerate(self.heads):
                _positive_int(h, f"prune.heads[{i}]")


@dataclass(frozen=True)
class FfnPrune:
    """Remove ``sparsity`` of the FFN neurons of every layer, ranked by importance."""

    sparsity: float = 0.5
    importance: str = "gradient"
    samples: int = 256  # training rows whose gradients rank the neurons/heads (gradient importance)

    def __post_init__(self):
        _unit(self.sparsity, "prune.sparsity")
        _choice(self.importance, "prune.importance", ("gradient", "magnitude"))
        _positive_int(self.samples, "prune.samples")


@dataclass(frozen=True)
class StructuredPrune:
    """Heads and FFN neurons together, each at ``sparsity``."""

    sparsity: float = 0.5
    importance: str = "gradient"
    samples: int = 256  # training rows whose gradients rank the neurons/heads (gradient importance)

    def __post_init__(self):
        _unit(self.sparsity, "prune.sparsity")
        _choice(self.importance, "prune.importance", ("gradient", "magnitude"))
        _positive_int(self.samples, "prune.samples")


PruneConfig = typing.Union[UnstructuredPrune, HeadPrune, FfnPrune, StructuredPrune]
_PRUNE_KINDS = {"unstructured": UnstructuredPrune, "heads": HeadPrune, "ffn": FfnPrune, "structured": StructuredPrune}


# --------------------------------------------------------------------------- quantization

_BITS = (4, 8)  # what workers.modules can store and run: int8 rows, or int4 packed two per byte
_GROUP_SIZES = (16, 32, 64, 128, 256)


def _bits(value, path: str) -> None:
    _check(value in _BITS and not isinstance(value, bool), path, "one of 4|8 (other widths have no kernel or "
           "packing here)", value)


def _group_size(value, path: str = "quant.group_size") -> None:
    _check(value in _GROUP_SIZES and not isinstance(value, bool), path, "one of 16|32|64|128|256", value)


def _embeddings(embeddings, embedding_bits) -> None:
    _check(isinstance(embeddings, bool), "quant.embeddings", "true or false", embeddings)
    _bits(embedding_bits, "quant.embedding_bits")


@dataclass(frozen=True)
class DynamicInt8:
    """Post-training dynamic INT8: int8 weights (per-channel), activations quantized on the fly."""

    embeddings: bool = True  # embeddings are half of MiniLM's parameters: store them in low bits too
    embedding_bits: int = 8  # 4 packs the word embeddings two per byte (one scale per 64 columns)

    def __post_init__(self):
        _embeddings(self.embeddings, self.embedding_bits)


@dataclass(frozen=True)
class StaticInt8:
    """Post-training static INT8 with a calibration pass over ``calibration_samples`` training rows."""

    calibration_samples: int = 128
    observer: str = "minmax"  # minmax | histogram | percentile
    embeddings: bool = True
    embedding_bits: int = 8

    def __post_init__(self):
        _positive_int(self.calibration_samples, "quant.calibration_samples")
        _choice(self.observer, "quant.observer", ("minmax", "histogram", "percentile"))
        _embeddings(self.embeddings, self.embedding_bits)


@dataclass(frozen=True)
class QatInt8:
    """Quantization-aware training: fake-quant (STE) during distillation, then converted to real int8."""

    embeddings: bool = True
    embedding_bits: int = 8
    observer_momentum: float = 0.01  # weight of each batch in the moving-average activation range

    def __post_init__(self):
        _embeddings(self.embeddings, self.embedding_bits)
        _unit(self.observer_momentum, "quant.observer_momentum", closed_high=True, open_low=True)


@dataclass(frozen=True)
class Int4WeightOnly:
    """INT4 weights packed two per byte with one scale per ``group_size`` inputs."""

    group_size: int = 64
    embeddings: bool = True
    embedding_bits: int = 4
    activations: str = "fp32"  # fp32: weight-only (dequantized at load); int8: dynamic int8 through the int8 GEMM

    def __post_init__(self):
        _group_size(self.group_size)
        _embeddings(self.embeddings, self.embedding_bits)
        _choice(self.activations, "quant.activations", ("fp32", "int8"))


@dataclass(frozen=True)
class MixedPrecision:
    """Per-layer bits chosen by sensitivity under an average bit budget: every encoder Linear starts at
    ``min(bits)``; the most sensitive ones (logit KL vs the fp32 model on ``calibration_samples`` rows when
    only that layer is low-bit) move to ``max(bits)`` while the parameter-weighted average stays ≤ budget."""

    bit_budget: float = 6.0  # average bits per Linear weight
    group_size: int = 64
    bits: tuple[int, ...] = (4, 8)
    calibration_samples: int = 64
    embeddings: bool = True
    embedding_bits: int = 8
    activations: str = "fp32"  # of the 4-bit layers (8-bit ones always use dynamic int8); see Int4WeightOnly

    def __post_init__(self):
        _choice(self.activations, "quant.activations", ("fp32", "int8"))
        if isinstance(self.bits, list):
            object.__setattr__(self, "bits", tuple(self.bits))
        _check(isinstance(self.bits, tuple) and len(self.bits) >= 1, "quant.bits", "a list of bit widths", self.bits)
        for i, b in enumerate(self.bits):
            _bits(b, f"quant.bits[{i}]")
        object.__setattr__(self, "bits", tuple(sorted(set(self.bits))))
        lo, hi = min(self.bits), max(self.bits)
        _check(isinstance(self.bit_budget, (int, float)) and not isinstance(self.bit_budget, bool)
               and lo <= self.bit_budget <= hi, "quant.bit_budget", f"a number in [{lo}, {hi}] (the bits)",
               self.bit_budget)
        _group_size(self.group_size)
        _positive_int(self.calibration_samples, "quant.calibration_samples")
        _embeddings(self.embeddings, self.embedding_bits)


QuantConfig = typing.Union[DynamicInt8, StaticInt8, QatInt8, Int4WeightOnly, MixedPrecision]
_QUANT_KINDS = {"dynamic": DynamicInt8, "static": StaticInt8, "qat": QatInt8, "int4": Int4WeightOnly,
                "mixed": MixedPrecision}


# --------------------------------------------------------------------------- low rank

@dataclass(frozen=True)
class LowRankConfig:
    """Replace FFN Linears by two thin ones (truncated SVD): rank = ceil(ratio * min(in, out)), or the
    smallest rank keeping ``energy`` of the squared singular values. A layer whose rank would reach the
    break-even in*out/(in+out) is left dense (two factors would not be smaller); ratio 1 therefore
    factorizes nothing, and a ratio above 1 (a rank beyond min(in, out)) is rejected here."""

    ratio: float | None = None  # 0.5 when neither ratio nor energy is given
    energy: float | None = None
    targets: tuple[str, ...] = ("intermediate.dense", "output.dense")

    def __post_init__(self):
        if self.ratio is None and self.energy is None:
            object.__setattr__(self, "ratio", 0.5)
        _check((self.ratio is None) != (self.energy is None), "lowrank", "exactly one of ratio or energy",
               {"ratio": self.ratio, "energy": self.energy})
        if self.ratio is not None:
            _unit(self.ratio, "lowrank.ratio", closed_high=True, open_low=True)
        if self.energy is not None:
            _unit(self.energy, "lowrank.energy", closed_high=True, open_low=True)
        _check(not isinstance(self.targets, str), "lowrank.targets", "a list of module-name suffixes", self.targets)
        object.__setattr__(self, "targets", tuple(self.targets))
        _check(len(self.targets) > 0 and all(isinstance(t, str) and t for t in self.targets), "lowrank.targets",
               "a non-empty list of module-name suffixes such as intermediate.dense", self.targets)


# --------------------------------------------------------------------------- distillation + training

@dataclass(frozen=True)
class DistillConfig:
    """Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)
    + hidden_weight * MSE(hidden states) + attention_weight * KL(attention maps)."""

    temperature: float = 2.0
    alpha: float = 0.9
    hidden_weight: float = 0.0
    attention_weight: float = 0.0

    def __post_init__(self):
        _check(isinstance(self.temperature, (int, float)) and 0 < self.temperature <= 50, "distill.temperature",
               "a number in (0, 50]", self.temperature)
        _check(isinstance(self.alpha, (int, float)) and 0 <= self.alpha <= 1, "distill.alpha", "a number in [0, 1]",
               self.alpha)
        _non_negative(self.hidden_weight, "distill.hidden_weight")
        _non_negative(self.attention_weight, "distill.attention_weight")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop, run on the DeepSpeed engine."""

    lr: float = 1e-4
    epochs: float = 1.0
    max_steps: int | None = None  # caps the steps implied by epochs
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    zero_stage: int = 0
    precision: str = "auto"  # auto: bf16 on a GPU that has it, fp32 on CPU
    seed: int = 0
    eval_every: int = 0  # steps between intermediate evaluations reported to the scheduler (0 = only at the end)

    def __post_init__(self):
        _check(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "train.lr", "a number in (0, 1)", self.lr)
        _check(isinstance(self.epochs, (int, float)) and self.epochs > 0, "train.epochs", "a number > 0", self.epochs)
        _positive_int(self.max_steps, "train.max_steps", allow_none=True)
        _positive_int(self.batch_size, "train.batch_size")
        _positive_int(self.grad_accum, "train.grad_accum")
        _non_negative(self.weight_decay, "train.weight_decay")
        _unit(self.warmup_ratio, "train.warmup_ratio")
        _choice(self.zero_stage, "train.zero_stage", (0, 1, 2, 3))
        _choice(self.precision, "train.precision", ("auto", "fp32", "bf16"))
        _check(isinstance(self.eval_every, int) and self.eval_every >= 0, "train.eval_every", "an integer ≥ 0",
               self.eval_every)


@dataclass(frozen=True)
class TrialConfig:
    """One point of the search space: everything a worker needs to build, compress and train a student."""

    student: StudentConfig = field(default_factory=StudentConfig)
    prune: PruneConfig | None = None
    lowrank: LowRankConfig | None = None
    quant: QuantConfig | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrialConfig":
        return from_dict(cls, d or {})


# --------------------------------------------------------------------------- JSON round trip

def _tag_of(obj) -> tuple[str, str] | None:
    """(tag key, value) of a tagged-union member: pruning says ``kind``, quantization says ``mode`` (DESIGN.md)."""
    for key, table in (("kind", _PRUNE_KINDS), ("mode", _QUANT_KINDS)):
        for kind, typ in table.items():
            if type(obj) is typ:
                return key, kind
    return None


def to_dict(cfg) -> dict:
    """A JSON-ready dict; tagged-union members carry their ``kind`` (pruning) or ``mode`` (quantization)."""
    out = {}
    tag = _tag_of(cfg)
    if tag is not None:
        out[tag[0]] = tag[1]
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def _build(typ, d, path: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must be a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    try:
        return typ(**d)
    except TypeError as err:  # e.g. a list where a scalar belongs
        raise ConfigError(f"{path}: {err}") from None


def _tagged(table: dict, d, path: str, key: str):
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: must be a mapping with a '{key}', got {d!r}")
    d = dict(d)
    kind = d.pop(key, None)
    if kind in (None, "none"):
        if kind is None and d:
            raise ConfigError(f"{path}.{key}: missing; allowed: none|{'|'.join(table)}")
        return None
    if kind not in table:
        raise ConfigError(f"{path}.{key}: must be one of none|{'|'.join(table)}, got {kind!r}")
    return _build(table[kind], d, path)


def from_dict(typ, d: dict):
    """Inverse of :func:`to_dict` for :class:`TrialConfig`; errors name the field."""
    if typ is not TrialConfig:
        return _build(typ, d, typ.__name__)
    if not isinstance(d, dict):
        raise ConfigError(f"trial config: must be a mapping, got {d!r}")
    known = {"student", "prune", "lowrank", "quant", "distill", "train"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"trial config: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
    lowrank = d.get("lowrank")
    if isinstance(lowrank, dict) and lowrank.get("ratio") in (0, None) and lowrank.get("energy") is None:
        lowrank = None  # ratio 0 is how a search space says "off"
    return TrialConfig(
        student=_build(StudentConfig, d.get("student", {}), "student"),
        prune=_tagged(_PRUNE_KINDS, d.get("prune"), "prune", "kind"),
        lowrank=None if lowrank is None else _build(LowRankConfig, lowrank, "lowrank"),
        quant=_tagged(_QUANT_KINDS, d.get("quant"), "quant", "mode"),
        distill=_build(DistillConfig, d.get("distill", {}), "distill"),
        train=_build(TrainConfig, d.get("train", {}), "train"),
    )
