"""What a finished trial reports, and so what a search may optimise or constrain: the one parser of objectives."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_serializer, model_validator

from common.config import Frozen, Problems

__all__ = ["OBJECTIVES", "DIRECTIONS", "Objective", "Objectives", "DEFAULT_OBJECTIVES"]

# The trial result contract; anything else is a typo that would silently never be reported.
OBJECTIVES = ("metric", "metric_drop", "size_bytes", "params", "latency_ms_b1", "latency_ms_b32", "train_seconds")
DIRECTIONS = ("max", "min")


class Objective(Frozen):
    """One objective: ``metric:max``, also written ``[metric, max]``, ``{metric: max}`` or
    ``{name: metric, mode: max}``."""

    name: Literal[OBJECTIVES] = Field(description="what the trial reports")
    mode: Literal[DIRECTIONS] = Field(description="max or min")

    @model_validator(mode="before")
    @classmethod
    def _short_forms(cls, data):
        if isinstance(data, str) and data.count(":") == 1:
            data = [s.strip() for s in data.split(":")]
        elif isinstance(data, dict) and len(data) == 1 and not {"name", "mode"} & set(data):
            data = list(next(iter(data.items())))
        if isinstance(data, (list, tuple)) and len(data) == 2:
            data = {"name": data[0], "mode": data[1]}
        if not isinstance(data, dict):
            raise ValueError(f"must be 'name:max' or 'name:min', got {data!r}")
        if data.get("name") not in OBJECTIVES:
            raise ValueError(f"no trial reports {data.get('name')!r}; use one of {', '.join(OBJECTIVES)}")
        if data.get("mode") not in DIRECTIONS:
            raise ValueError(f"mode must be max or min, got {data.get('mode')!r}")
        return data

    @model_serializer
    def _short(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return f"{self.name}:{self.mode}"


def _once(objectives: tuple) -> tuple:
    seen = set()
    for i, o in enumerate(objectives):
        if o.name in seen:
            raise Problems((f"[{i}]", f"{o.name} is listed twice; list each objective once"))
        seen.add(o.name)
    return objectives


# A Pareto front needs at least 2 objectives; its hypervolume is exact for up to 3.
Objectives = Annotated[tuple[Objective, ...], Field(min_length=2, max_length=3), AfterValidator(_once)]
DEFAULT_OBJECTIVES = (Objective(name="metric", mode="max"), Objective(name="size_bytes", mode="min"),
                      Objective(name="latency_ms_b1", mode="min"))
