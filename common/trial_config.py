"""Typed, validated trial configs: one frozen pydantic model per concept.

Behaviour is chosen by the *type* of a config (``HeadPrune`` vs ``UnstructuredPrune``), never by a string
deep inside model code. Pruning is a union discriminated by ``kind``, quantization by ``mode``. Every
config reports all its problems at once with their paths and round-trips through JSON with
``model_dump(mode="json")`` / ``model_validate``. The bounds declared here are the only copy: the search
space reads its ranges from them.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal, Optional, Union

from pydantic import BeforeValidator, Field, field_validator, model_validator

from common.config import Bool, Float, Frozen, Int, Problems, Str

__all__ = [
    "StudentConfig", "UnstructuredPrune", "HeadPrune", "FfnPrune", "StructuredPrune", "PruneConfig",
    "DynamicInt8", "StaticInt8", "QatInt8", "Int4WeightOnly", "MixedPrecision", "QuantConfig",
    "LowRankConfig", "VocabConfig", "DistillConfig", "TrainConfig", "TeacherTrainConfig", "TrialConfig", "no_bool",
]


def _not_bool(value):
    # YAML's `true` would pass as the integer 1 where a Literal of numbers is expected
    if isinstance(value, bool):
        raise ValueError(f"must be a number, got {value!r}")
    return value


no_bool = BeforeValidator(_not_bool)

Count = Annotated[Int, Field(ge=1)]
Importance = Literal["gradient", "magnitude"]
Bits = Annotated[Literal[4, 8], no_bool]  # int8 rows, or int4 packed two per byte: what workers.modules can run
GroupSize = Annotated[Literal[16, 32, 64, 128, 256], no_bool]


# --------------------------------------------------------------------------- student

class StudentConfig(Frozen):
    """Student shape. ``None`` keeps the teacher's value."""

    _prefix: ClassVar[str] = "student"

    # the cap only keeps samplers' integer arithmetic sane; no student comes near it
    layers: Optional[Int] = Field(None, ge=1, le=1_000_000, description="encoder layers kept")
    layer_choice: Literal["uniform", "bottom", "top"] = Field(
        "uniform", description="which teacher layers to keep: spread evenly, the bottom k or the top k")
    hidden: Optional[Int] = Field(None, ge=1, le=1_000_000, description="hidden width")
    heads: Optional[Int] = Field(None, ge=1, le=1_000_000, description="attention heads per layer")
    ffn: Optional[Int] = Field(None, ge=1, le=1_000_000, description="FFN (intermediate) width")

    @model_validator(mode="after")
    def _divisible(self):
        if self.hidden is not None and self.heads is not None and self.hidden % self.heads:
            raise Problems(("hidden", f"must be divisible by student.heads ({self.heads}), got {self.hidden}"))
        return self


# --------------------------------------------------------------------------- pruning

Sparsity = Annotated[Float, Field(ge=0, lt=1, description="share of weights / heads / neurons removed")]
Samples = Annotated[Int, Field(ge=1, description="training rows whose gradients rank the heads or neurons "
                                                 "(gradient importance)")]


class UnstructuredPrune(Frozen):
    """Magnitude pruning of Linear weights to ``sparsity``, ramped by the cubic schedule
    s_t = s_f + (s_i - s_f)(1 - t/T)^3 (Zhu & Gupta, 2017) during distillation."""

    _prefix: ClassVar[str] = "prune"

    kind: Literal["unstructured"] = "unstructured"
    sparsity: Sparsity = 0.5
    scope: Literal["global", "layer"] = Field("global", description="rank weights over all layers, or per layer")
    initial_sparsity: Float = Field(0.0, ge=0, lt=1, description="sparsity at the start of the ramp")
    schedule: Literal["cubic", "oneshot"] = Field("cubic", description="cubic ramp, or all at once at the start")
    end_fraction: Float = Field(0.75, gt=0, le=1,
                                description="the ramp reaches the final sparsity at this share of training")

    @model_validator(mode="after")
    def _ramp(self):
        if self.initial_sparsity > self.sparsity:
            raise Problems(("initial_sparsity", f"must be ≤ prune.sparsity ({self.sparsity}), "
                                                f"got {self.initial_sparsity}"))
        return self


class HeadPrune(Frozen):
    """Remove ``sparsity`` of all attention heads (ranked globally by importance; every layer keeps ≥ 1)."""

    _prefix: ClassVar[str] = "prune"

    kind: Literal["heads"] = "heads"
    sparsity: Sparsity = 0.5
    importance: Importance = Field("gradient", description="Michel et al. 2019 gradient importance, or weight "
                                                           "magnitude")
    heads: Optional[tuple[Count, ...]] = Field(None, description="explicit heads to keep per layer (overrides "
                                                                 "sparsity)")
    samples: Samples = 256


class FfnPrune(Frozen):
    """Remove ``sparsity`` of the FFN neurons of every layer, ranked by importance."""

    _prefix: ClassVar[str] = "prune"

    kind: Literal["ffn"] = "ffn"
    sparsity: Sparsity = 0.5
    importance: Importance = "gradient"
    samples: Samples = 256


class StructuredPrune(Frozen):
    """Heads and FFN neurons together, each at ``sparsity``."""

    _prefix: ClassVar[str] = "prune"

    kind: Literal["structured"] = "structured"
    sparsity: Sparsity = 0.5
    importance: Importance = "gradient"
    samples: Samples = 256


PruneConfig = Annotated[Union[UnstructuredPrune, HeadPrune, FfnPrune, StructuredPrune], Field(discriminator="kind")]


# --------------------------------------------------------------------------- quantization

Embeddings = Annotated[Bool, Field(description="embeddings are half of MiniLM's parameters: store them in low "
                                               "bits too")]
EmbeddingBits = Annotated[Bits, Field(description="4 packs the word embeddings two per byte (one scale per 64 "
                                                  "columns)")]
Activations = Literal["fp32", "int8"]


class DynamicInt8(Frozen):
    """Post-training dynamic INT8: int8 weights (per-channel), activations quantized on the fly."""

    _prefix: ClassVar[str] = "quant"

    mode: Literal["dynamic"] = "dynamic"
    embeddings: Embeddings = True
    embedding_bits: EmbeddingBits = 8


class StaticInt8(Frozen):
    """Post-training static INT8 with a calibration pass over ``calibration_samples`` training rows."""

    _prefix: ClassVar[str] = "quant"

    mode: Literal["static"] = "static"
    calibration_samples: Count = 128
    observer: Literal["minmax", "histogram", "percentile"] = "minmax"
    embeddings: Embeddings = True
    embedding_bits: EmbeddingBits = 8


class QatInt8(Frozen):
    """Quantization-aware training: fake-quant (STE) during distillation, then converted to real int8."""

    _prefix: ClassVar[str] = "quant"

    mode: Literal["qat"] = "qat"
    embeddings: Embeddings = True
    embedding_bits: EmbeddingBits = 8
    observer_momentum: Float = Field(0.01, gt=0, le=1, description="weight of each batch in the moving-average "
                                                                   "activation range")


class Int4WeightOnly(Frozen):
    """INT4 weights packed two per byte with one scale per ``group_size`` inputs."""

    _prefix: ClassVar[str] = "quant"

    mode: Literal["int4"] = "int4"
    group_size: GroupSize = Field(64, description="inputs sharing one scale")
    embeddings: Embeddings = True
    embedding_bits: EmbeddingBits = 4
    activations: Activations = Field("fp32", description="fp32: weight-only (dequantized at load); int8: dynamic "
                                                         "int8 through the int8 GEMM")


class MixedPrecision(Frozen):
    """Per-layer bits chosen by sensitivity under an average bit budget: every encoder Linear starts at
    ``min(bits)``; the most sensitive ones (logit KL vs the fp32 model on ``calibration_samples`` rows when
    only that layer is low-bit) move to ``max(bits)`` while the parameter-weighted average stays ≤ budget."""

    _prefix: ClassVar[str] = "quant"

    mode: Literal["mixed"] = "mixed"
    bit_budget: Float = Field(6.0, description="average bits per Linear weight, within the bits")
    group_size: GroupSize = 64
    bits: tuple[Bits, ...] = Field((4, 8), min_length=1, description="the widths a layer may get")
    calibration_samples: Count = 64
    embeddings: Embeddings = True
    embedding_bits: Bits = 8
    activations: Activations = Field("fp32", description="of the 4-bit layers (8-bit ones always use dynamic int8)")

    @field_validator("bits")
    @classmethod
    def _sorted(cls, bits):
        return tuple(sorted(set(bits)))

    @model_validator(mode="after")
    def _budget(self):
        lo, hi = min(self.bits), max(self.bits)
        if not lo <= self.bit_budget <= hi:
            raise Problems(("bit_budget", f"must be in [{lo}, {hi}] (the bits), got {self.bit_budget}"))
        return self


QuantConfig = Annotated[Union[DynamicInt8, StaticInt8, QatInt8, Int4WeightOnly, MixedPrecision],
                        Field(discriminator="mode")]


# --------------------------------------------------------------------------- low rank

class LowRankConfig(Frozen):
    """Replace FFN Linears by two thin ones (truncated SVD): rank = ceil(ratio * min(in, out)), or the
    smallest rank keeping ``energy`` of the squared singular values. A layer whose rank would reach the
    break-even in*out/(in+out) is left dense (two factors would not be smaller); ratio 1 therefore
    factorizes nothing, and a ratio above 1 (a rank beyond min(in, out)) is rejected here."""

    _prefix: ClassVar[str] = "lowrank"

    ratio: Optional[Float] = Field(None, gt=0, le=1, description="rank as a share of min(in, out); 0.5 when "
                                                                 "neither ratio nor energy is given")
    energy: Optional[Float] = Field(None, gt=0, le=1, description="share of the squared singular values kept")
    targets: tuple[Annotated[Str, Field(min_length=1)], ...] = Field(
        ("intermediate.dense", "output.dense"), min_length=1, description="module-name suffixes to factorize")

    @model_validator(mode="before")
    @classmethod
    def _default_ratio(cls, data):
        if isinstance(data, dict) and data.get("ratio") is None and data.get("energy") is None:
            return {**data, "ratio": 0.5}
        return data

    @field_validator("targets", mode="before")
    @classmethod
    def _not_a_string(cls, value):
        if isinstance(value, str):  # a bare string would be read as a list of characters
            raise ValueError(f"must be a list of module-name suffixes such as intermediate.dense, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_of(self):
        if (self.ratio is None) == (self.energy is None):
            raise Problems(("", f"give exactly one of ratio or energy, got ratio={self.ratio}, "
                                f"energy={self.energy}"))
        return self


# --------------------------------------------------------------------------- vocabulary

class VocabConfig(Frozen):
    """Vocabulary pruning: the word embeddings keep only the tokens of the students' training rows, every special
    token and every single character (plain and ``##``), re-indexed before any embedding quantization, and the
    artifact ships a WordPiece tokenizer over exactly those tokens (an unseen word splits into kept pieces)."""

    _prefix: ClassVar[str] = "vocab"

    prune: Bool = Field(False, description="keep only the tokens the task uses (smaller word embeddings); the "
                                            "position embeddings are cut to task.max_length too")


# --------------------------------------------------------------------------- distillation + training

class DistillConfig(Frozen):
    """Loss = alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(labels)
    + hidden_weight * MSE(hidden states) + attention_weight * KL(attention maps)."""

    _prefix: ClassVar[str] = "distill"

    temperature: Float = Field(2.0, gt=0, le=50, description="softens both distributions")
    alpha: Float = Field(0.9, ge=0, le=1, description="weight of the teacher's soft labels against the true ones")
    hidden_weight: Float = Field(0.0, ge=0, description="weight of the hidden-state MSE")
    attention_weight: Float = Field(0.0, ge=0, description="weight of the attention-map KL")


class TrainConfig(Frozen):
    """The optimisation loop, run on the DeepSpeed engine."""

    _prefix: ClassVar[str] = "train"

    lr: Float = Field(1e-4, gt=0, lt=1, description="peak learning rate")
    epochs: Float = Field(1.0, gt=0, description="passes over the training rows")
    max_steps: Optional[Int] = Field(None, ge=1, description="caps the steps implied by epochs")
    batch_size: Count = 32
    grad_accum: Count = 1
    weight_decay: Float = Field(0.01, ge=0)
    warmup_ratio: Float = Field(0.06, ge=0, lt=1, description="share of the steps spent warming up")
    zero_stage: Annotated[Literal[0, 1, 2, 3], no_bool] = Field(0, description="DeepSpeed ZeRO stage")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on a GPU that has it, "
                                                                          "fp32 on CPU")
    seed: Int = 0
    eval_every: Int = Field(0, ge=0, description="steps between intermediate evaluations reported to the "
                                                 "scheduler (0 = only at the end)")
    group_by_length: Bool = Field(True, description="batch rows of similar length together (less padding)")


class TeacherTrainConfig(TrainConfig):
    """Fine-tuning the teacher on the task, once per job (cached by its inputs)."""

    _prefix: ClassVar[str] = "teacher_train"

    lr: Float = Field(5e-5, gt=0, lt=1, description="peak learning rate")
    train_size: Optional[Int] = Field(None, ge=1, description="training rows the teacher sees (None: all of "
                                                              "the task's training rows)")
    seeds: tuple[Int, ...] = Field((0,), min_length=1, description="one teacher per seed")


class TrialConfig(Frozen):
    """One point of the search space: everything a worker needs to build, compress and train a student."""

    student: StudentConfig = Field(default_factory=StudentConfig)
    prune: Optional[PruneConfig] = None
    lowrank: Optional[LowRankConfig] = None
    quant: Optional[QuantConfig] = None
    vocab: VocabConfig = Field(default_factory=VocabConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _off_switches(cls, data):
        # how configs stored by earlier versions (and the search space) say "off"
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section, tag in (("prune", "kind"), ("quant", "mode")):
            if isinstance(data.get(section), dict) and data[section].get(tag) == "none":
                data[section] = None
        lowrank = data.get("lowrank")
        if isinstance(lowrank, dict) and lowrank.get("ratio") == 0 and lowrank.get("energy") is None:
            data["lowrank"] = None
        return data
