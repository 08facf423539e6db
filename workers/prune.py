"""Pruning: structured (attention heads, FFN neurons: removed from the weight shapes) and unstructured
(magnitude masks over the encoder Linear weights, ramped up during distillation).

Structured importance, for a model with heads h and FFN neurons j:
  * ``gradient`` (Michel et al., 2019): a mask ξ of ones multiplies each head's context vector (the input of
    the attention output projection) and each FFN activation (the input of the down-projection);
    I = Σ_batches |∂L/∂ξ|, with L the KD loss against the cached teacher logits of those rows when given, else
    cross-entropy on the labels. For a neuron, ∂L/∂ξ_j = Σ_tokens a_j·∂L/∂a_j: the |activation·gradient| score.
    Head scores are L2-normalised per layer before the global ranking, as Michel et al. do.
  * ``magnitude``: ‖rows of Q, K, V‖·‖columns of O‖ per head, ‖up-projection row‖·‖down-projection column‖ per
    neuron, with the same per-layer normalisation for heads.
Heads are ranked globally (layers may end up with different counts, each keeps ≥ 1); FFN neurons per layer.

Unstructured: ``prune`` applies the initial sparsity (the final one for ``oneshot``) and ``schedule`` returns
the callback that ``distill`` runs after every optimizer step. It follows the cubic schedule of Zhu & Gupta
(2017), grows the masks from the magnitudes of the still-unpruned weights (a pruned weight never comes back)
and zeroes the pruned weights again, so they are exactly zero whenever training stops. Masks live in the
callback (fp32 weights on the module, as DeepSpeed fp32/ZeRO-0/1/2 trains them in place); a resumed run
rebuilds them from the zeros of the checkpointed weights. Every ``nn.Linear`` under the encoder is covered,
including the two factors of a :class:`~workers.modules.LowRankLinear` and QAT's fake-quant Linears. ZeRO-3
partitions the weights away from the module, so unstructured pruning needs ZeRO stage 0-2; with bf16 the
engine's fp32 master weights of pruned entries drift, but the weights the model runs and saves are re-zeroed
after every step.

Structured pruning runs first in a trial (before low rank and quantization), on plain ``nn.Linear`` layers.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.trial_config import FfnPrune, HeadPrune, PruneConfig, StructuredPrune, UnstructuredPrune
from common.errors import ConfigError
from workers.shapes import keep_ffn, keep_heads, layers_of

__all__ = ["prune", "schedule", "cubic_sparsity", "target_sparsity", "head_importance", "ffn_importance",
           "gradient_importance", "select_heads", "encoder_linears", "sparsity_of"]

_BATCH = 32


# --------------------------------------------------------------------------- the verbs

def prune(model: nn.Module, cfg: PruneConfig, *, data=None, teacher_logits: np.ndarray | None = None) -> nn.Module:
    """Prune ``model`` in place as ``cfg`` says; returns it. ``data`` (a workers.data.Encoded) and its cached
    ``teacher_logits`` are only read by gradient importance."""
    if isinstance(cfg, UnstructuredPrune):
        start = cfg.sparsity if cfg.schedule == "oneshot" else cfg.initial_sparsity
        linears = encoder_linears(model)
        masks = _grow([m.weight for _, m in linears], [m.weight != 0 for _, m in linears], start, cfg.scope)
        _apply([m.weight for _, m in linears], masks)
        return model
    if not isinstance(cfg, (HeadPrune, FfnPrune, StructuredPrune)):
        raise TypeError(f"prune: unsupported config {type(cfg).__name__}")
    for layer in layers_of(model):
        att = layer.attention
        if not all(type(m) is nn.Linear for m in (att.self.query, att.self.key, att.self.value, att.output.dense,
                                                   layer.intermediate.dense, layer.output.dense)):
            raise TypeError("prune: heads/FFN pruning works on plain nn.Linear layers; prune before "
                            "factorize/prepare_qat/quantize")
    do_heads = isinstance(cfg, (HeadPrune, StructuredPrune))
    do_ffn = isinstance(cfg, (FfnPrune, StructuredPrune))
    layers = layers_of(model)
    if isinstance(cfg, HeadPrune) and cfg.heads is not None:
        _check_head_counts(cfg.heads, layers)
    elif cfg.sparsity == 0:
        return model
    if cfg.importance == "gradient":
        if data is None:
            raise ConfigError("prune.importance: gradient importance needs training rows (data=...); "
                              "use importance: magnitude to prune without data")
        h_scores, f_scores = gradient_importance(model, data, teacher_logits, samples=cfg.samples)
    else:
        h_scores = [head_importance(layer) for layer in layers]
        f_scores = [ffn_importance(layer) for layer in layers]
    if do_heads:
        counts = cfg.heads if isinstance(cfg, HeadPrune) and cfg.heads is not None else None
        for layer, keep in zip(layers, select_heads(h_scores, cfg.sparsity, counts)):
            if len(keep) < layer.attention.self.num_attention_heads:
                keep_heads(layer, keep)
    if do_ffn:
        for layer, s in zip(layers, f_scores):
            n = len(s)
            k = max(1, n - round(cfg.sparsity * n))
            if k < n:
                keep_ffn(layer, torch.topk(s, k).indices.sort().values.tolist())
    return model


def schedule(model: nn.Module, cfg: PruneConfig | None) -> Callable[[int, int, nn.Module], None] | None:
    """The after-step callback of gradual (or one-shot, kept during training) magnitude pruning; ``None`` for
    anything but :class:`UnstructuredPrune`."""
    if not isinstance(cfg, UnstructuredPrune):
        return None
    linears = encoder_linears(model)
    weights = [m.weight for _, m in linears]
    masks = [w != 0 for w in weights]  # what prune() (or an earlier run) already removed

    def step(t: int, total: int, _model: nn.Module) -> None:
        with torch.no_grad():
            masks[:] = [m.to(w.device) for m, w in zip(masks, weights)]  # the engine may have moved the model
            masks[:] = _grow(weights, masks, target_sparsity(cfg, t, total), cfg.scope)
            _apply(weights, masks)

    return step


# --------------------------------------------------------------------------- the schedule (pure)

def cubic_sparsity(t: float, ramp_steps: float, initial: float, final: float) -> float:
    """s_t = s_f + (s_i − s_f)(1 − t/T)³ for t < T, then s_f (Zhu & Gupta, 2017)."""
    if ramp_steps <= 0 or t >= ramp_steps:
        return final
    return final + (initial - final) * (1 - max(t, 0) / ramp_steps) ** 3


def target_sparsity(cfg: UnstructuredPrune, step: int, total: int) -> float:
    if cfg.schedule == "oneshot":
        return cfg.sparsity
    return cubic_sparsity(step, max(1, round(cfg.end_fraction * total)), cfg.initial_sparsity, cfg.sparsity)


# --------------------------------------------------------------------------- unstructured masks

def encoder_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` (subclasses included) under the encoder layers; pooler and classifier excluded."""
    return [(n, m) for n, m in layers_of(model).named_modules() if isinstance(m, nn.Linear)]


def sparsity_of(model: nn.Module) -> float:
    ws = [m.weight for _, m in encoder_linears(model)]
    return sum(int((w == 0).sum()) for w in ws) / max(1, sum(w.numel() for w in ws))


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """A bool mask selecting exactly the ``k`` smallest entries of a 1-D tensor (ties broken by position)."""
    sel = torch.zeros_like(scores, dtype=torch.bool)
    if k <= 0:
        return sel
    if k >= len(scores):
        return ~sel
    thr = scores.kthvalue(k).values
    sel = scores < thr
    need = k - int(sel.sum())
    if need > 0:
        sel[(scores == thr).nonzero().flatten()[:need]] = True
    return sel


def _grow(weights: list[torch.Tensor], masks: list[torch.Tensor], sparsity: float, scope: str) -> list[torch.Tensor]:
    """Masks (True = kept) with round(sparsity·n) pruned, n per matrix (``layer``) or over all (``global``):
    the already-pruned weights plus the smallest magnitudes among the others. Never un-prunes."""
    with torch.no_grad():
        # pruned weights score -1 so they are always among the smallest: masks only grow
        scores = [torch.where(m, w.detach().abs().float(), torch.full_like(w, -1.0, dtype=torch.float32)).flatten()
                  for w, m in zip(weights, masks)]
        if scope == "layer":
            out = []
            for s, m in zip(scores, masks):
                k = round(sparsity * len(s))
                out.append(m if k <= int((~m).sum()) else ~_smallest(s, k).reshape(m.shape))
            return out
        flat = torch.cat(scores) if scores else torch.zeros(0)
        k = round(sparsity * len(flat))
        if k <= sum(int((~m).sum()) for m in masks):
            return list(masks)
        keep = ~_smallest(flat, k)
        out, start = [], 0
        for m in masks:
            out.append(keep[start:start + m.numel()].reshape(m.shape))
            start += m.numel()
        return out


def _apply(weights: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for w, m in zip(weights, masks):
            w.masked_fill_(~m, 0)


# --------------------------------------------------------------------------- structured importance

def head_importance(layer) -> torch.Tensor:
    """Magnitude importance of each head: ‖its Q, K, V rows‖ · ‖its columns of the output projection‖."""
    att = layer.attention.self
    h, d = att.num_attention_heads, att.attention_head_size
    qkv = torch.stack([att.query.weight, att.key.weight, att.value.weight]).detach().reshape(3, h, d, -1)
    o = layer.attention.output.dense.weight.detach().reshape(-1, h, d)
    return qkv.pow(2).sum((0, 2, 3)).sqrt() * o.pow(2).sum((0, 2)).sqrt()


def ffn_importance(layer) -> torch.Tensor:
    """Magnitude importance of each FFN neuron: ‖up-projection row‖ · ‖down-projection column‖."""
    return (layer.intermediate.dense.weight.detach().norm(dim=1) * layer.output.dense.weight.detach().norm(dim=0))


def gradient_importance(model: nn.Module, data, teacher_logits: np.ndarray | None = None, *, samples: int = 256,
                        batch_size: int = _BATCH) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(per-layer head scores, per-layer FFN neuron scores): Σ over batches of |∂L/∂mask| (see module doc)."""
    layers = layers_of(model)
    head_masks, ffn_masks, hooks = [], [], []
    for layer in layers:
        att = layer.attention.self
        hm = torch.ones(att.num_attention_heads, requires_grad=True)
        fm = torch.ones(layer.output.dense.in_features, requires_grad=True)
        d = att.attention_head_size
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(
            lambda mod, args, hm=hm, d=d: (args[0] * hm.repeat_interleave(d),)))
        hooks.append(layer.output.dense.register_forward_pre_hook(lambda mod, args, fm=fm: (args[0] * fm,)))
        head_masks.append(hm)
        ffn_masks.append(fm)
    h_acc = [torch.zeros_like(m) for m in head_masks]
    f_acc = [torch.zeros_like(m) for m in ffn_masks]
    rows = np.random.default_rng(0).permutation(len(data))[:samples]
    was_training = model.training
    model.eval()  # no dropout: the scores should not depend on which units happened to be dropped
    try:
        for start in range(0, len(rows), batch_size):
            idx = np.sort(rows[start:start + batch_size])
            b = data.batch(idx)
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).logits
            if teacher_logits is not None:
                t = torch.from_numpy(np.asarray(teacher_logits[idx], dtype=np.float32))
                loss = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(t, -1), reduction="batchmean",
                                log_target=True)
            else:
                loss = F.cross_entropy(logits, b["labels"])
            grads = torch.autograd.grad(loss, head_masks + ffn_masks)
            for acc, g in zip(h_acc + f_acc, grads):
                acc += g.abs()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return h_acc, f_acc


def _normalised(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    return [s / s.norm().clamp_min(1e-12) for s in scores]


def select_heads(scores: list[torch.Tensor], sparsity: float, counts=None) -> list[list[int]]:
    """Heads to keep per layer. With ``counts`` each layer keeps its top-``counts[i]``; otherwise
    round(sparsity · all heads) are removed, least important first over all layers (scores normalised per
    layer), never the last head of a layer."""
    if counts is not None:
        return [sorted(torch.topk(s, c).indices.tolist()) for s, c in zip(scores, counts)]
    norm = _normalised([s.detach().float() for s in scores])
    total = sum(len(s) for s in norm)
    to_remove = round(sparsity * total)
    order = sorted(((float(v), li, h) for li, s in enumerate(norm) for h, v in enumerate(s)))
    left = [len(s) for s in norm]
    removed = [set() for _ in norm]
    for _, li, h in order:
        if to_remove == 0:
            break
        if left[li] > 1:
            removed[li].add(h)
            left[li] -= 1
            to_remove -= 1
    return [[h for h in range(len(s)) if h not in removed[li]] for li, s in enumerate(norm)]


def _check_head_counts(counts: tuple[int, ...], layers) -> None:
    if len(counts) != len(layers):
        raise ConfigError(f"prune.heads: must give one count per layer ({len(layers)} layers), got {list(counts)}")
    for i, (c, layer) in enumerate(zip(counts, layers)):
        h = layer.attention.self.num_attention_heads
        if c > h:
            raise ConfigError(f"prune.heads[{i}]: must be ≤ the {h} heads layer {i} has, got {c}")
