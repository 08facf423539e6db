"""One trial, top to bottom: build the student → shrink its structure → distill on the DeepSpeed engine
→ quantize → save the artifact → load it back and measure what was saved.

The order is fixed: structure first (layers, heads, FFN neurons, low rank: they change shapes, so they come
before training lets the student recover), then distillation (with the gradual unstructured-pruning schedule
and QAT fake-quant inside it), then conversion to low-bit weights (which only rounds what training settled).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from common.trial_config import TrialConfig
from workers.data import Encoded, label_names

__all__ = ["TrialContext", "run"]


@dataclass
class TrialContext:
    """Everything a trial reads besides its config; built once per job and shared by all trials."""

    teacher_uri: str
    # the bar: metric_drop is measured against teacher_metrics["metric"], dev_metric_drop against its "dev_metric"
    teacher_metrics: dict
    train: Encoded
    eval: Encoded  # the dev split: measured once, at the end, for promotion and the reports
    teacher_logits: np.ndarray
    metric: str  # accuracy | f1 | accuracy_f1
    out_dir: str  # the artifact is written here
    seq_len: int = 128
    latency_threads: int = 1
    latency_runs: int = 20
    report: Callable[[dict, str | None], None] | None = None  # (intermediate metrics, checkpoint dir or None)
    is_chief: bool = True  # in data-parallel trials only rank 0 saves and measures
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    resume: bool = False
    provenance: dict = field(default_factory=dict)  # job id, dataset, ... written into the artifact
    max_size_bytes: float | None = None  # the job's size limit: a config over it is never trained
    # the selection split the search scores on (intermediate reports and the result's metric); None: the dev split
    select: Encoded | None = None
    # a student already shaped as cfg.student says (an elastic finalist: the sub-model sliced from the
    # super-student), trained from its weights instead of a fresh teacher initialisation
    initial_model: object | None = None


def run(cfg: TrialConfig, ctx: TrialContext) -> dict:
    """Run the recipe for ``cfg``; returns the trial result (its keys: docs/architecture.md). ``metric``,
    ``metric_drop``, ``accuracy`` and ``f1`` are the selection split's (``ctx.select``), ``dev_*`` the dev
    split's; without a selection split both are the dev split's."""
    from workers import artifacts
    from workers.distill import distill
    from workers.evaluate import measure, predict_logits, task_metrics
    from workers.lowrank import factorize
    from workers.prune import prune, schedule
    from workers.quantize import prepare_qat, quantize
    from workers.student import build

    t0 = time.perf_counter()
    needs_teacher_model = cfg.distill.hidden_weight > 0 or cfg.distill.attention_weight > 0
    teacher, tokenizer, _ = artifacts.load(ctx.teacher_uri,
                                           attn_implementation="eager" if needs_teacher_model else "sdpa")

    # 1. structure
    student = ctx.initial_model.train() if ctx.initial_model is not None else build(teacher, cfg.student)
    if cfg.vocab.prune:
        student, teacher, tokenizer, ctx = _prune_vocab(student, teacher if needs_teacher_model else None,
                                                        tokenizer, ctx)
    if cfg.prune is not None:
        student = prune(student, cfg.prune, data=ctx.train, teacher_logits=ctx.teacher_logits)
    if cfg.lowrank is not None:
        student = factorize(student, cfg.lowrank)
    # size and batch-1 latency follow from the config alone: known before training, so the scheduler ranks on
    # them from the first report and a config over the size limit is never trained
    fixed = {}
    if ctx.report is not None or ctx.max_size_bytes is not None:
        fixed = fixed_objectives(student, cfg, ctx)
        if ctx.max_size_bytes is not None and fixed["size_bytes"] > ctx.max_size_bytes:
            return _infeasible(fixed, ctx, time.perf_counter() - t0)

    # 2. distillation (pruning schedule and fake-quant live inside it)
    if cfg.quant is not None:
        student = prepare_qat(student, cfg.quant)  # a no-op unless the config is QAT
    callbacks = [cb for cb in (schedule(student, cfg.prune),) if cb is not None]
    if ctx.report is not None and cfg.train.eval_every:
        def evaluate_now(step, total, model):
            if step % cfg.train.eval_every == 0 and step < total:
                scored = ctx.eval if ctx.select is None else ctx.select
                m = task_metrics(predict_logits(model, scored), scored.labels, ctx.metric)
                model.train()
                saved = bool(ctx.checkpoint_dir and ctx.checkpoint_every and step % ctx.checkpoint_every == 0)
                ctx.report({"step": step, "metric": m["metric"],
                            "metric_drop": ctx.teacher_metrics["metric"] - m["metric"], **fixed},
                           ctx.checkpoint_dir if saved else None)
        callbacks.append(evaluate_now)
    trained = distill(student, ctx.train, cfg.distill, cfg.train, teacher_logits=ctx.teacher_logits,
                      teacher=teacher if needs_teacher_model else None, callbacks=callbacks,
                      checkpoint_dir=ctx.checkpoint_dir, checkpoint_every=ctx.checkpoint_every, resume=ctx.resume)

    if not ctx.is_chief:
        return {"train_steps": trained.steps}

    # 3. low-bit conversion (PTQ calibrates on training rows)
    if cfg.quant is not None:
        student = quantize(student, cfg.quant, calibration=ctx.train)

    # 4. save, then measure the artifact as it will be served
    meta = {"role": "student", "trial_config": cfg.model_dump(mode="json", exclude_none=True),
            "teacher": ctx.teacher_uri, "label_names": _label_names(student, ctx.provenance), **ctx.provenance}
    info = artifacts.save(student, tokenizer, ctx.out_dir, meta=meta)
    loaded, own_tokenizer, _ = artifacts.load(info.uri)
    if cfg.vocab.prune:  # measured as it is served: the dev text through the artifact's own tokenizer
        from workers.vocab import retokenise

        ctx = dataclasses.replace(ctx, eval=retokenise(ctx.eval, own_tokenizer),
                                  select=None if ctx.select is None else retokenise(ctx.select, own_tokenizer))
    m = measure(loaded, ctx.eval, ctx.metric, seq_len=ctx.seq_len, threads=ctx.latency_threads,
                runs=ctx.latency_runs)
    dev = {k: m.pop(k) for k in ("metric", "accuracy", "f1") if k in m}
    scored = dev if ctx.select is None else task_metrics(predict_logits(loaded, ctx.select), ctx.select.labels,
                                                         ctx.metric)
    result = {
        **m,
        **scored,
        "metric_drop": ctx.teacher_metrics["metric"] - scored["metric"],
        **{f"dev_{k}": v for k, v in dev.items()},
        # a bundle prepared before the selection split existed has only the dev split's "metric"
        "dev_metric_drop": ctx.teacher_metrics.get("dev_metric", ctx.teacher_metrics["metric"]) - dev["metric"],
        "size_bytes": info.size_bytes,
        "artifact_bytes": info.artifact_bytes,
        "sha256": info.sha256,
        "artifact_uri": info.uri,
        "sparsity": _sparsity(loaded),
        "bits": _bits(cfg),
        "embedding_bits": getattr(cfg.quant, "embedding_bits", 32) if getattr(cfg.quant, "embeddings", False) else 32,
        "train_steps": trained.steps,
        "train_workers": trained.world_size,
        "resumed_from_step": trained.resumed_from,
        "train_loss": trained.loss,
        "train_seconds": trained.seconds,
        "trial_seconds": time.perf_counter() - t0,
    }
    artifacts.update_meta(info.uri, metrics=result)
    return result


def _prune_vocab(student, teacher, tokenizer, ctx: TrialContext):
    """The student re-indexed to the tokens its training rows use (plus every special token and single character)
    and its position embeddings cut to the rows' max length; the training rows re-numbered and the dev and
    selection text tokenised with the pruned tokenizer. A teacher run on each batch (hidden-state or attention
    KD) reads the same re-numbered rows, so its embeddings are re-indexed too."""
    from workers.vocab import prune_vocab, reindex, retokenise

    vocab = prune_vocab(tokenizer, ctx.train)
    student = reindex(student, vocab.kept, max_length=ctx.train.max_length)
    if teacher is not None:
        teacher = reindex(teacher, vocab.kept)
    ctx = dataclasses.replace(ctx, train=vocab.remap(ctx.train), eval=retokenise(ctx.eval, vocab.tokenizer),
                              select=None if ctx.select is None else retokenise(ctx.select, vocab.tokenizer))
    return student, teacher, vocab.tokenizer, ctx


def _label_names(model, provenance: dict) -> list[str]:
    """The dataset's names of the model's classes: the endpoint answers with them."""
    values = [model.config.id2label.get(i, str(i)) for i in range(model.config.num_labels)]
    return list(label_names(str((provenance.get("task") or {}).get("dataset", "")), values))


def fixed_objectives(student, cfg: TrialConfig, ctx: TrialContext) -> dict:
    """``size_bytes`` and ``latency_ms_b1`` of the artifact this config will save, from the untrained (already
    structurally compressed) student: a copy gets the final unstructured sparsity and the low-bit conversion,
    is saved to a scratch directory exactly as the trial saves its artifact, and loaded back and timed. Shapes,
    storage formats and the number of zeros are set by the config, so only the weights' values differ from the
    trained model (mixed precision, which picks its bits by sensitivity, may differ by a few layers' bytes)."""
    import copy
    import tempfile

    from workers import artifacts
    from common.trial_config import UnstructuredPrune
    from workers.evaluate import latency_ms
    from workers.prune import prune
    from workers.quantize import prepare_qat, quantize

    model = copy.deepcopy(student)
    if isinstance(cfg.prune, UnstructuredPrune):
        model = prune(model, cfg.prune.model_copy(update={"schedule": "oneshot"}))
    if cfg.quant is not None:
        model = quantize(prepare_qat(model, cfg.quant), cfg.quant, calibration=ctx.train)
    with tempfile.TemporaryDirectory(prefix="slimray-size-") as scratch:
        size = artifacts.save(model, None, scratch).size_bytes
        loaded, _, _ = artifacts.load(scratch, with_tokenizer=False)
    # a student whose position embeddings were cut (vocabulary pruning) is timed at the length it can take
    seq_len = min(ctx.seq_len, getattr(loaded.config, "max_position_embeddings", None) or ctx.seq_len)
    ms = latency_ms(loaded, batch=1, seq_len=seq_len, runs=ctx.latency_runs, threads=ctx.latency_threads)
    return {"size_bytes": size, "latency_ms_b1": ms}


def _infeasible(fixed: dict, ctx: TrialContext, seconds: float) -> dict:
    """The one result of a config over the size limit. The searcher is told the worst task metric there is
    (0, so the drop is the teacher's whole metric) next to the true size and latency: a point no feasible trial
    loses to, which Optuna learns to avoid."""
    return {**fixed, "infeasible": True, "metric": 0.0, "metric_drop": float(ctx.teacher_metrics["metric"]),
            "train_steps": 0, "trial_seconds": seconds,
            "stopped_by": f"infeasible: {fixed['size_bytes'] / 1e6:.3f} MB before training, over "
                          f"constraints.max_size_mb {ctx.max_size_bytes / 1e6:g}"}


def _bits(cfg: TrialConfig) -> float:
    from common.trial_config import Int4WeightOnly, MixedPrecision

    if cfg.quant is None:
        return 32
    if isinstance(cfg.quant, Int4WeightOnly):
        return 4
    if isinstance(cfg.quant, MixedPrecision):
        return cfg.quant.bit_budget
    return 8


def _sparsity(model) -> float:
    """Share of zeros among the encoder's stored 2-D weights, float or int8 (int4-packed ones are skipped)."""
    import torch

    zeros = total = 0
    for name, t in model.state_dict().items():
        if ".encoder." in f".{name}" and t.dim() == 2 and t.dtype in (torch.float32, torch.int8):
            zeros += int((t == 0).sum())
            total += t.numel()
    return zeros / total if total else 0.0
