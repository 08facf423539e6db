"""Physically shrink BERT layers: keep some attention heads or FFN neurons, drop the rest from the weights.

transformers 5 removed ``prune_heads``; its attention reshapes with ``view(..., -1, head_size)``, so a layer
runs with any head count once Q/K/V/O have the right shapes. Per-layer shapes are recorded in the config
(``slimray_layers``) so an artifact can be rebuilt without the teacher.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["layers_of", "layer_shapes", "keep_heads", "keep_ffn", "apply_shapes", "record_shapes"]


def layers_of(model) -> nn.ModuleList:
    base = getattr(model, model.base_model_prefix, model)
    return base.encoder.layer


def _linear(src: nn.Linear, rows=None, cols=None) -> nn.Linear:
    w = src.weight.data
    b = src.bias.data if src.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    out.weight.data.copy_(w)
    if b is not None:
        out.bias.data.copy_(b)
    return out


def layer_shapes(model) -> list[dict]:
    shapes = []
    for layer in layers_of(model):
        att = layer.attention.self
        shapes.append({"heads": att.num_attention_heads, "head_dim": att.attention_head_size,
                       "ffn": layer.intermediate.dense.out_features
                       if hasattr(layer.intermediate.dense, "out_features") else None})
    return shapes


def keep_heads(layer, keep: list[int]) -> None:
    """Keep only heads ``keep`` (indices) of this layer: rows of Q/K/V and columns of the output projection."""
    att = layer.attention.self
    if not keep:
        raise ValueError("a layer must keep at least one attention head")
    d = att.attention_head_size
    idx = torch.cat([torch.arange(h * d, (h + 1) * d) for h in sorted(keep)])
    att.query, att.key, att.value = (_linear(m, rows=idx) for m in (att.query, att.key, att.value))
    layer.attention.output.dense = _linear(layer.attention.output.dense, cols=idx)
    att.num_attention_heads = len(keep)
    att.all_head_size = len(keep) * d


def keep_ffn(layer, keep: list[int]) -> None:
    """Keep only FFN neurons ``keep``: rows of the up-projection, columns of the down-projection."""
    if not keep:
        raise ValueError("a layer must keep at least one FFN neuron")
    idx = torch.tensor(sorted(keep))
    layer.intermediate.dense = _linear(layer.intermediate.dense, rows=idx)
    layer.output.dense = _linear(layer.output.dense, cols=idx)


def apply_shapes(model, shapes: list[dict]) -> None:
    """Give a freshly built model the recorded per-layer shapes (weights are loaded afterwards)."""
    for layer, s in zip(layers_of(model), shapes):
        att = layer.attention.self
        if s["heads"] != att.num_attention_heads:
            keep_heads(layer, list(range(s["heads"])))
        if s.get("ffn") is not None and s["ffn"] != layer.intermediate.dense.out_features:
            keep_ffn(layer, list(range(s["ffn"])))


def record_shapes(model) -> None:
    model.config.slimray_layers = layer_shapes(model)
