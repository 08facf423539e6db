"""Compressed building blocks that replace ``nn.Linear`` / ``nn.Embedding`` inside a model.

Each class stores its low-bit or factored form as ordinary parameters/buffers (so it lands in
``model.safetensors`` as is) and describes its own shape with ``structure()``; ``from_structure`` builds an
empty one of that shape for loading. ``BUILDERS`` maps the ``type`` tag written in an artifact's
``config.json`` to the class; it is the only place a tag is turned into code, at load time.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["LowRankLinear", "BUILDERS", "compressed_modules", "replace_module"]


class LowRankLinear(nn.Module):
    """``W ≈ U @ V``: a Linear(in, rank) followed by a Linear(rank, out) with the original bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x):
        return self.second(self.first(x))

    def structure(self) -> dict:
        return {"type": "lowrank", "in": self.in_features, "out": self.out_features, "rank": self.rank,
                "bias": self.second.bias is not None}

    @classmethod
    def from_structure(cls, s: dict) -> "LowRankLinear":
        return cls(s["in"], s["out"], s["rank"], s["bias"])


BUILDERS: dict[str, type] = {"lowrank": LowRankLinear}


def compressed_modules(model: nn.Module):
    """(name, module) for every module that describes its own structure, outermost first."""
    for name, mod in model.named_modules():
        if hasattr(mod, "structure") and hasattr(type(mod), "from_structure"):
            yield name, mod


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
