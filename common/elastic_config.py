"""Configs of the elastic strategy (issue 14): one weight-sharing super-student, many sliced sub-models.

* :class:`ElasticConfig` — how the super-student is trained (its steps, the sandwich rule, random
  sub-configurations per step, which layers a depth keeps, checkpoints) and how many finalists get a short
  distillation afterwards. The spec's ``elastic`` section.
* :class:`SubSpace` — the sub-configurations the super-student serves: the depths, heads per layer and FFN widths
  (the space's layer, head and FFN choices). Its largest point is the super-student's own shape.
* :class:`SubConfig` — one sub-configuration: a depth, and the first ``heads`` heads and first ``ffn`` FFN neurons
  of every layer that depth keeps (the super-student is ordered so that every narrower width is a prefix).

The models live here, not in ``workers``, so the search space and the spec can read them without torch.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Optional

from pydantic import Field, field_validator, model_validator

from common.config import Bool, Float, Frozen, Int, Problems
from common.trial_config import StudentConfig

__all__ = ["ElasticConfig", "SubSpace", "SubConfig"]

Count = Annotated[Int, Field(ge=1, le=1_000_000)]
# one definition of which layers a depth keeps: the trials strategy's own choice
LayerChoice = StudentConfig.model_fields["layer_choice"].annotation


class ElasticConfig(Frozen):
    """Training the super-student and its finalists. Each optimizer step sums the distillation loss of the
    largest and the smallest sub-configuration (the sandwich rule, when on) and of ``samples_per_step`` random
    ones, all drawn from a generator seeded by the step."""

    _prefix: ClassVar[str] = "elastic"

    epochs: Float = Field(1.0, gt=0, le=1000, description="passes of the super-student over the training rows")
    steps: Optional[Int] = Field(None, ge=1, description="caps the optimizer steps the epochs imply")
    samples_per_step: Int = Field(2, ge=0, le=64, description="random sub-configurations trained at each step, "
                                                              "besides the sandwich's largest and smallest")
    sandwich: Bool = Field(True, description="train the largest and the smallest sub-configuration at every step")
    layer_choice: LayerChoice = Field("uniform", description="which of the super-student's layers a depth keeps: "
                                                             "spread evenly, the bottom k or the top k")
    checkpoint_every: Int = Field(50, ge=1, description="optimizer steps between super-student checkpoints")
    importance_samples: Int = Field(256, ge=1, description="training rows whose gradients rank heads and neurons "
                                                           "before they are reordered")
    finalists: Int = Field(3, ge=0, le=1000, description="best sub-models on the front that get a short "
                                                         "distillation (0: none)")
    finalist_steps: Int = Field(200, ge=1, description="distillation steps of each finalist")

    @model_validator(mode="after")
    def _trains_something(self):
        if not self.sandwich and self.samples_per_step == 0:
            raise Problems(("samples_per_step", "must be ≥ 1 when elastic.sandwich is off (a step would train "
                                                "nothing), got 0"))
        return self


class SubSpace(Frozen):
    """The sub-configurations the super-student is trained for and sliced at; each list is kept sorted."""

    _prefix: ClassVar[str] = "search.student"

    depths: tuple[Count, ...] = Field(min_length=1, description="encoder layers a sub-model may keep")
    heads: tuple[Count, ...] = Field(min_length=1, description="attention heads per layer a sub-model may keep")
    ffn: tuple[Count, ...] = Field(min_length=1, description="FFN neurons per layer a sub-model may keep")

    @field_validator("depths", "heads", "ffn")
    @classmethod
    def _sorted(cls, values):
        return tuple(sorted(set(values)))

    @property
    def largest(self) -> "SubConfig":
        return SubConfig(depth=self.depths[-1], heads=self.heads[-1], ffn=self.ffn[-1])

    @property
    def smallest(self) -> "SubConfig":
        return SubConfig(depth=self.depths[0], heads=self.heads[0], ffn=self.ffn[0])

    def __contains__(self, sub: "SubConfig") -> bool:
        return sub.depth in self.depths and sub.heads in self.heads and sub.ffn in self.ffn


class SubConfig(Frozen):
    """One sub-model of the super-student: ``depth`` layers (chosen by the elastic layer choice), each with its
    first ``heads`` attention heads and first ``ffn`` FFN neurons."""

    _prefix: ClassVar[str] = "sub"

    depth: Count
    heads: Count
    ffn: Count
