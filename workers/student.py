"""Build a student from a teacher, DistilBERT-style: copy the weights of the layers (and dimensions) kept."""
from __future__ import annotations

import copy

import torch

from common.trial_config import StudentConfig
from common.errors import ConfigError
from workers.shapes import keep_ffn, keep_heads, layers_of

__all__ = ["build", "pick_layers"]


def pick_layers(n: int, k: int, how: str) -> list[int]:
    """Which k of n teacher layers a student keeps: spread evenly (always including the last), bottom or top."""
    if not 1 <= k <= n:
        raise ConfigError(f"student.layers: must be in [1, {n}] (the teacher has {n} layers), got {k}")
    if how == "bottom":
        return list(range(k))
    if how == "top":
        return list(range(n - k, n))
    return sorted({round((i + 1) * n / k) - 1 for i in range(k)})


def _neuron_scores(layer) -> torch.Tensor:
    up, down = layer.intermediate.dense.weight, layer.output.dense.weight
    return up.norm(dim=1) * down.norm(dim=0)


def _head_scores(layer) -> torch.Tensor:
    att = layer.attention.self
    d = att.attention_head_size
    w = torch.cat([att.query.weight, att.key.weight, att.value.weight], 0)
    o = layer.attention.output.dense.weight
    h = att.num_attention_heads
    return torch.stack([w.reshape(3, h, d, -1)[:, i].norm() * o[:, i * d:(i + 1) * d].norm() for i in range(h)])


def _narrow_hidden(model, hidden: int):
    """Keep the first ``hidden`` model dimensions everywhere; each head keeps its first hidden/heads dims."""
    cfg = model.config
    heads = cfg.num_attention_heads
    if hidden % heads:
        raise ConfigError(f"student.hidden: must be divisible by the number of heads ({heads}), got {hidden}")
    old_d, new_d = cfg.hidden_size // heads, hidden // heads
    dims = torch.arange(hidden)
    head_dims = torch.cat([torch.arange(h * old_d, h * old_d + new_d) for h in range(heads)])
    sd = model.state_dict()
    new_cfg = copy.deepcopy(cfg)
    new_cfg.hidden_size = hidden
    new = type(model)(new_cfg)
    new_sd = {}
    for name, t in sd.items():
        target = new.state_dict()[name]
        if t.shape == target.shape:
            new_sd[name] = t
            continue
        rows = head_dims if any(k in name for k in (".query.", ".key.", ".value.")) else dims
        cols = head_dims if "attention.output.dense" in name else dims
        if t.dim() == 1:
            new_sd[name] = t[rows[: target.shape[0]]] if t.shape[0] != target.shape[0] else t
        else:
            r = rows if t.shape[0] != target.shape[0] else torch.arange(t.shape[0])
            c = cols if t.shape[1] != target.shape[1] else torch.arange(t.shape[1])
            new_sd[name] = t[r][:, c]
    new.load_state_dict(new_sd)
    return new


def build(teacher, cfg: StudentConfig):
    """A new model initialised from ``teacher``'s weights with the shape ``cfg`` asks for."""
    n = teacher.config.num_hidden_layers
    student = copy.deepcopy(teacher)
    student.train()
    if cfg.layers is not None and cfg.layers != n:
        keep = pick_layers(n, cfg.layers, cfg.layer_choice)
        layers = layers_of(student)
        kept = torch.nn.ModuleList([layers[i] for i in keep])
        getattr(student, student.base_model_prefix).encoder.layer = kept
        student.config.num_hidden_layers = len(kept)
    if cfg.heads is not None:
        for i, layer in enumerate(layers_of(student)):
            h = layer.attention.self.num_attention_heads
            if cfg.heads > h:
                raise ConfigError(f"student.heads: must be ≤ the teacher's {h} heads per layer, got {cfg.heads}")
            top = torch.topk(_head_scores(layer), cfg.heads).indices.tolist()
            keep_heads(layer, top)
    if cfg.ffn is not None:
        for layer in layers_of(student):
            f = layer.intermediate.dense.out_features
            if cfg.ffn > f:
                raise ConfigError(f"student.ffn: must be ≤ the teacher's FFN size {f}, got {cfg.ffn}")
            keep_ffn(layer, torch.topk(_neuron_scores(layer), cfg.ffn).indices.tolist())
    if cfg.hidden is not None and cfg.hidden != student.config.hidden_size:
        if cfg.hidden > student.config.hidden_size:
            raise ConfigError(f"student.hidden: must be ≤ the teacher's {student.config.hidden_size}, got {cfg.hidden}")
        if cfg.heads is not None or cfg.ffn is not None:
            raise ConfigError("student.hidden: narrowing the hidden size cannot be combined with student.heads/ffn; "
                              "use prune.kind heads/ffn for those")
        student = _narrow_hidden(student, cfg.hidden)
    return student
