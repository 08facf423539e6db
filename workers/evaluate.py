"""Measure a model: task metric on the eval split, size on disk, non-zero parameters, latency.

Latency is measured on the real (loaded) artifact: median of ``runs`` timed forward passes after
``warmup`` untimed ones, at a fixed thread count and a fixed sequence length, for batch 1 and batch 32.
"""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import numpy as np
import torch

from workers.data import Encoded

__all__ = ["predict_logits", "task_metrics", "nonzero_params", "latency_ms", "measure"]


@torch.no_grad()
def predict_logits(model, data: Encoded, batch_size: int = 64) -> np.ndarray:
    model.eval()
    # Sorting by length keeps padding (wasted compute) small; results are put back in the original order.
    order = np.argsort(data.lengths, kind="stable")
    out = np.zeros((len(data), model.config.num_labels), dtype=np.float32)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = data.batch(idx)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       token_type_ids=b["token_type_ids"]).logits
        out[idx] = logits.float().cpu().numpy()
    return out


def task_metrics(logits: np.ndarray, labels: np.ndarray, metric: str) -> dict:
    """``metric`` is the number the search optimises (accuracy, or F1 of class 1 for ``f1``);
    pairs tasks (``accuracy_f1``) report both and optimise accuracy."""
    pred = logits.argmax(-1)
    acc = float((pred == labels).mean()) * 100
    out = {"accuracy": acc}
    if metric in ("f1", "accuracy_f1"):
        tp = int(((pred == 1) & (labels == 1)).sum())
        fp = int(((pred == 1) & (labels != 1)).sum())
        fn = int(((pred != 1) & (labels == 1)).sum())
        out["f1"] = 100 * 2 * tp / max(1, 2 * tp + fp + fn)
    out["metric"] = out["f1"] if metric == "f1" else acc
    return out


def nonzero_params(model) -> int:
    """Non-zero stored weights, counting low-bit tensors (int8/uint8 buffers) by their values.
    Modules with a ``nonzero()`` method (workers.modules' quantized ones) count their own tensors."""
    total, own = 0, []
    for name, mod in model.named_modules():
        if hasattr(mod, "nonzero") and not any(name.startswith(p) for p in own):
            total += mod.nonzero()
            own.append(name + ".")
    for name, t in model.state_dict().items():
        if any(name.startswith(p) for p in own):
            continue
        if name.endswith("position_ids") or not torch.is_tensor(t) or t.dtype == torch.bool:
            continue
        if name.endswith(("scale", "scales", "zero_point")):
            continue
        if t.dtype == torch.uint8 and name.endswith("packed"):  # two int4 values per byte
            lo, hi = t & 0x0F, t >> 4
            total += int((lo != 8).sum() + (hi != 8).sum())
            continue
        total += int((t != 0).sum())
    return total


@contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@torch.no_grad()
def latency_ms(model, *, batch: int, seq_len: int, runs: int = 20, warmup: int = 5, threads: int = 1,
               vocab: int | None = None) -> float:
    """Median milliseconds per forward pass on random tokens of exactly ``seq_len`` (no padding), or of as many as
    the model has positions for (a vocabulary-pruned model keeps only the task's max length)."""
    model.eval()
    seq_len = min(seq_len, getattr(model.config, "max_position_embeddings", None) or seq_len)
    vocab = vocab or model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=g)  # skip special tokens
    mask = torch.ones_like(ids)
    tt = torch.zeros_like(ids)
    times = []
    with _threads(threads):
        for i in range(warmup + runs):
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(model, data: Encoded, metric: str, *, seq_len: int, threads: int = 1, runs: int = 20,
            batch_sizes=(1, 32)) -> dict:
    """Task metrics, non-zero params and latency at each batch size (``latency_ms_b<N>``)."""
    out = task_metrics(predict_logits(model, data), data.labels, metric)
    out["params"] = nonzero_params(model)
    for b in batch_sizes:
        out[f"latency_ms_b{b}"] = latency_ms(model, batch=b, seq_len=seq_len, runs=runs, threads=threads)
    return out
