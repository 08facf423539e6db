"""Quantization: real low-bit weights in the artifact and int8 kernels at inference.

Two verbs, dispatched on the config's type:
  * ``prepare_qat(model, cfg)`` swaps the encoder Linears (and the word embeddings) for fake-quant versions
    before distillation when ``cfg`` is :class:`QatInt8`; a no-op otherwise.
  * ``quantize(model, cfg, calibration=...)`` converts the model to :mod:`workers.modules`' ``QLinear`` /
    ``QEmbedding``, whose int8 / packed-int4 buffers are what ``model.safetensors`` stores:

    ===============  ==================================  ==============================================
    config           weights                             activations (the matmul)
    ===============  ==================================  ==============================================
    DynamicInt8      int8, one scale per output channel  int8 from each input's own range (fbgemm)
    StaticInt8       int8 per channel                    int8 with the per-tensor range calibrated on
                                                         ``calibration_samples`` rows (minmax, 99.99th
                                                         percentile, or MSE-optimal histogram clipping)
    QatInt8          int8 per channel (as trained)       int8 with the moving-average range from training
    Int4WeightOnly   int4 + fp16 scale per group         fp32 (weights dequantized at load), or int8
    MixedPrecision   int4 or int8 per layer, by          int8 layers: dynamic int8; int4 ones: as
                     sensitivity under the bit budget     Int4WeightOnly
    ===============  ==================================  ==============================================

What stays fp32, and why: LayerNorms and biases (a few thousand numbers; LayerNorm divides by a variance,
where int8 rounding is amplified), the pooler and classifier (the head: 0.6 MB for MiniLM, its error goes straight
into the logits, and it runs on one token), position and token-type embeddings (3% of MiniLM's weights,
added to every token, so an error there shifts every position). The word embeddings — half of MiniLM's
parameters — are quantized per row when ``cfg.embeddings`` is set.

Only the encoder's Linears are converted, including the factors of a LowRankLinear. Zeros from unstructured
pruning stay zeros in int8/int4 but are then stored densely (a bitmask no longer pays at 8 bits).
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.trial_config import DynamicInt8, Int4WeightOnly, MixedPrecision, QatInt8, QuantConfig, StaticInt8
from common.errors import ConfigError
from workers.modules import (FakeQuantEmbedding, FakeQuantLinear, QEmbedding, QLinear, activation_qparams,
                             replace_module)
from workers.shapes import layers_of

__all__ = ["prepare_qat", "quantize", "assign_bits", "percentile_range", "mse_range", "calibrate_ranges",
           "layer_sensitivity", "EMBEDDING_GROUP"]

log = logging.getLogger(__name__)

EMBEDDING_GROUP = 64  # int4 embedding group size for configs without a group_size of their own
_BATCH = 32
_BINS = 2048


# --------------------------------------------------------------------------- the verbs

def prepare_qat(model: nn.Module, cfg: QuantConfig | None) -> nn.Module:
    """Fake-quant the encoder Linears (and word embeddings) for QAT; a no-op unless ``cfg`` is QatInt8."""
    if not isinstance(cfg, QatInt8):
        return model
    for name, lin in _linears(model):
        if type(lin) is nn.Linear:
            replace_module(model, name, FakeQuantLinear.from_linear(lin, momentum=cfg.observer_momentum))
    if cfg.embeddings:
        name, emb = _word_embeddings(model)
        if type(emb) is nn.Embedding:
            replace_module(model, name, FakeQuantEmbedding.from_embedding(emb, bits=cfg.embedding_bits,
                                                                          group_size=EMBEDDING_GROUP))
    return model


def quantize(model: nn.Module, cfg: QuantConfig, *, calibration=None) -> nn.Module:
    """Convert ``model`` in place to real low-bit modules as ``cfg`` says; returns it in eval mode.
    ``calibration`` (a workers.data.Encoded, usually the training rows) is needed by StaticInt8, by QatInt8 when
    the model never ran in training mode, and used by MixedPrecision for its sensitivities."""
    # the int8 kernels are CPU ones and the artifact is fp32 + low-bit: undo a GPU / bf16 training placement
    model.cpu().float().eval()
    if isinstance(cfg, QatInt8):
        _convert_qat(model, cfg, calibration)
        return model
    linears = _linears(model)
    if isinstance(cfg, DynamicInt8):
        for name, lin in linears:
            replace_module(model, name, QLinear.from_linear(lin, bits=8, act="dynamic"))
    elif isinstance(cfg, StaticInt8):
        if calibration is None:
            raise ConfigError("quant.calibration_samples: static int8 needs calibration rows (calibration=...)")
        ranges = calibrate_ranges(model, [lin for _, lin in linears],
                                  _batches(calibration, cfg.calibration_samples), cfg.observer)
        for (name, lin), rng in zip(linears, ranges):
            replace_module(model, name, QLinear.from_linear(lin, bits=8, act="static", input_range=rng))
    elif isinstance(cfg, Int4WeightOnly):
        act = "none" if cfg.activations == "fp32" else "dynamic"
        for name, lin in linears:
            replace_module(model, name, QLinear.from_linear(lin, bits=4, group_size=cfg.group_size, act=act))
    elif isinstance(cfg, MixedPrecision):
        _mixed(model, linears, cfg, calibration)
    else:
        raise TypeError(f"quantize: unsupported config {type(cfg).__name__}")
    if cfg.embeddings:
        _quantize_embeddings(model, cfg.embedding_bits, getattr(cfg, "group_size", EMBEDDING_GROUP))
    return model


# --------------------------------------------------------------------------- pieces

def _linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(full name, module) of every nn.Linear under the encoder layers (LowRank factors and fake-quant included)."""
    layers = layers_of(model)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    return [(f"{prefix}.{n}", m) for n, m in layers.named_modules() if isinstance(m, nn.Linear)]


def _word_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb), emb


def _quantize_embeddings(model: nn.Module, bits: int, group_size: int) -> None:
    name, emb = _word_embeddings(model)
    if isinstance(emb, nn.Embedding):
        replace_module(model, name, QEmbedding.from_embedding(emb, bits=bits, group_size=group_size))


def _batches(data, n: int, batch_size: int = _BATCH) -> list[dict]:
    """``n`` seeded-random rows of ``data`` as model-input batches (labels dropped)."""
    rows = np.random.default_rng(0).permutation(len(data))[:n]
    out = []
    for start in range(0, len(rows), batch_size):
        b = data.batch(np.sort(rows[start:start + batch_size]))
        out.append({k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")})
    return out


def _convert_qat(model: nn.Module, cfg: QatInt8, calibration) -> None:
    if not any(isinstance(m, FakeQuantLinear) for _, m in _linears(model)):
        prepare_qat(model, cfg)  # never trained with fake quant: this is then static PTQ with a moving average
    fakes = [(n, m) for n, m in _linears(model) if isinstance(m, FakeQuantLinear)]
    unseen = [m for _, m in fakes if not bool(m.observed)]
    if unseen:
        if calibration is None:
            raise ConfigError("quant: a QAT model that never ran in training mode needs calibration rows "
                              "(calibration=...) to fix its activation ranges")
        with torch.no_grad():
            for m in unseen:
                m.train()  # observe only: the rest of the model stays in eval mode (no dropout)
            for b in _batches(calibration, 128):
                model(**b)
            for m in unseen:
                m.eval()
    for name, m in fakes:
        replace_module(model, name, QLinear.from_linear(m, bits=8, act="static",
                                                        input_range=tuple(m.act_range.tolist())))
    name, emb = _word_embeddings(model)
    if isinstance(emb, FakeQuantEmbedding):
        replace_module(model, name, QEmbedding.from_embedding(emb, bits=emb.bits, group_size=emb.group_size))
    elif cfg.embeddings and isinstance(emb, nn.Embedding):
        _quantize_embeddings(model, cfg.embedding_bits, EMBEDDING_GROUP)
    model.eval()


# --------------------------------------------------------------------------- static calibration

@torch.no_grad()
def calibrate_ranges(model: nn.Module, linears: list[nn.Module], batches: list[dict],
                     observer: str) -> list[tuple[float, float]]:
    """The input range (lo, hi) of each Linear over ``batches``: min/max, or clipped from a histogram."""
    lo = [math.inf] * len(linears)
    hi = [-math.inf] * len(linears)

    def minmax(i):
        def hook(mod, args):
            x = args[0].detach()
            lo[i], hi[i] = min(lo[i], float(x.min())), max(hi[i], float(x.max()))
        return hook

    _run_with_hooks(model, linears, minmax, batches)
    if observer == "minmax":
        return list(zip(lo, hi))
    hists = [torch.zeros(_BINS, dtype=torch.float64) for _ in linears]

    def histogram(i):
        def hook(mod, args):
            hists[i] += torch.histc(args[0].detach().float(), bins=_BINS, min=lo[i], max=hi[i]).double()
        return hook

    _run_with_hooks(model, linears, histogram, batches)
    pick = percentile_range if observer == "percentile" else mse_range
    return [pick(h.numpy(), a, b) for h, a, b in zip(hists, lo, hi)]


def _run_with_hooks(model, linears, make_hook, batches) -> None:
    hooks = [lin.register_forward_pre_hook(make_hook(i)) for i, lin in enumerate(linears)]
    try:
        for b in batches:
            model(**b)
    finally:
        for h in hooks:
            h.remove()


def percentile_range(hist: np.ndarray, lo: float, hi: float, tail: float = 1e-4) -> tuple[float, float]:
    """The 0.01th and 99.99th percentiles of a histogram over [lo, hi] (bin edges, so slightly generous)."""
    cdf = np.cumsum(hist) / max(hist.sum(), 1)
    edges = np.linspace(lo, hi, len(hist) + 1)
    first = int(np.searchsorted(cdf, tail, side="left"))
    last = int(np.searchsorted(cdf, 1 - tail, side="left"))
    return float(edges[first]), float(edges[min(last + 1, len(hist))])


def mse_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The range, among the min/max and tails clipped at a few percentiles, whose uint8 grid (see
    ``activation_qparams``) gives the least expected squared error over the histogram: uniform rounding
    noise step²/12 inside the representable range, the clipping distance outside it."""
    centers = (np.linspace(lo, hi, len(hist) + 1)[:-1] + np.linspace(lo, hi, len(hist) + 1)[1:]) / 2
    best, best_err = (lo, hi), math.inf
    for tail in (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2):
        a, b = percentile_range(hist, lo, hi, tail) if tail else (lo, hi)
        scale, zp = activation_qparams(a, b)
        qlo, qhi = -zp * scale, (255 - zp) * scale
        clipped = np.clip(centers, qlo, qhi)
        err = float((hist * np.where(centers == clipped, scale * scale / 12, (centers - clipped) ** 2)).sum())
        if err < best_err:
            best, best_err = (a, b), err
    return best


# --------------------------------------------------------------------------- mixed precision

def assign_bits(sensitivity: list[float], sizes: list[int], bits: tuple[int, ...], budget: float) -> list[int]:
    """Every layer at min(bits); then, most sensitive first, a layer moves to max(bits) when the
    size-weighted average stays ≤ ``budget`` (a greedy knapsack: a big layer that does not fit is skipped
    and smaller, less sensitive ones may still move up)."""
    lo, hi = min(bits), max(bits)
    out = [lo] * len(sizes)
    total = sum(sizes)
    used = lo * total
    for i in sorted(range(len(sizes)), key=lambda i: -sensitivity[i]):
        if used + (hi - lo) * sizes[i] <= budget * total + 1e-9:
            out[i] = hi
            used += (hi - lo) * sizes[i]
    return out


@torch.no_grad()
def layer_sensitivity(model: nn.Module, linears: list[tuple[str, nn.Linear]], make, batches: list[dict] | None
                      ) -> list[float]:
    """Per Linear: mean KL(fp32 logits || logits with only that Linear replaced by ``make(linear)``) over
    ``batches``; without batches, the relative weight error ‖W − Q(W)‖/‖W‖ (no data, no forward passes)."""
    if not batches:
        out = []
        for _, lin in linears:
            w = lin.weight.detach().float()
            out.append(float((make(lin).dequantized_weight() - w).norm() / w.norm().clamp_min(1e-12)))
        return out
    ref = [F.log_softmax(model(**b).logits.float(), -1) for b in batches]
    out = []
    for name, lin in linears:
        replace_module(model, name, make(lin))
        try:
            kl = sum(F.kl_div(F.log_softmax(model(**b).logits.float(), -1), r, reduction="sum", log_target=True)
                     for b, r in zip(batches, ref))
        finally:
            replace_module(model, name, lin)
        out.append(float(kl) / sum(len(b["input_ids"]) for b in batches))
    return out


def _mixed(model: nn.Module, linears, cfg: MixedPrecision, calibration) -> None:
    lo, hi = min(cfg.bits), max(cfg.bits)
    low_act = "none" if cfg.activations == "fp32" else "dynamic"

    def make(lin, bits):
        return (QLinear.from_linear(lin, bits=8, act="dynamic") if bits == 8 else
                QLinear.from_linear(lin, bits=4, group_size=cfg.group_size, act=low_act))

    batches = _batches(calibration, cfg.calibration_samples) if calibration is not None else None
    sens = layer_sensitivity(model, linears, lambda lin: make(lin, lo), batches) if lo != hi else [0.0] * len(linears)
    chosen = assign_bits(sens, [lin.weight.numel() for _, lin in linears], cfg.bits, cfg.bit_budget)
    for (name, lin), bits in zip(linears, chosen):
        replace_module(model, name, make(lin, bits))
    sizes = [lin.weight.numel() for _, lin in linears]
    log.info("mixed precision: %d of %d Linears at %d bits, average %.2f bits", sum(b == hi for b in chosen),
             len(chosen), hi, sum(b * s for b, s in zip(chosen, sizes)) / max(1, sum(sizes)))
