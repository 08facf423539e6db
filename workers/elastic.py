"""The elastic strategy's two recipes: train one weight-sharing super-student, then score its sub-models.

Public API (configs in ``common.elastic_config``; the model side in ``workers.supernet``)::

    sup = supernet.build_super(teacher, space, cfg, train_rows, teacher_logits)        # reordered, elastic
    res = train_super(sup, train_rows, cfg, distill_cfg, train_cfg, out_dir,
                      teacher_logits=..., progress=fn)                                  # -> SuperResult
    sup, tok, _ = supernet.load_super(res.uri)                                          # in a sub-model trial
    ev = with_pruned_vocab(SubEval(...), tokenizer, train_rows)                         # vocab.prune, once a job
    result = evaluate_sub(sup, SubConfig(depth=2, heads=4, ffn=512), quant, ev, save_to=None)
    draw(space, cfg, step, seed) -> list[SubConfig]                                     # what a step trains

Design:
  * **Sandwich rule** (Yu & Huang 2019, as DynaBERT and BigNAS train): each optimizer step sums the distillation
    loss (``workers.distill``'s KD losses, unchanged) of the largest and the smallest sub-configuration and of
    ``cfg.samples_per_step`` random ones, and takes one optimizer step on the sum: the largest keeps the shared
    weights good, the smallest pulls up the bottom of the space, the random ones cover the middle.
  * **Seeding.** The sub-configurations of a step come from a generator seeded by ``(train.seed, step)`` alone,
    so every data-parallel rank draws the same ones without talking to the others, and a resumed run draws again
    exactly what the killed one drew at that step.
  * **One loop.** Training is ``workers.distill.distill`` (DeepSpeed engine, data order, checkpoints, resume)
    with a ``step_loss`` hook; nothing of the loop is duplicated. ``train_super`` checkpoints into
    ``out_dir/checkpoints`` every ``cfg.checkpoint_every`` steps and always resumes from the last checkpoint there,
    so calling it again after a kill continues instead of starting over; the trained super-student is saved as an
    artifact in ``out_dir/super``.
  * **Sub-model trials are training-free**: slice (``supernet.slice``, real smaller shapes), re-index the word
    embeddings to the job's pruned vocabulary when there is one (``workers.vocab``: built once from the training
    rows, the same for every sub-model), quantize (dynamic or static INT8 with calibration, INT4, mixed, low-bit
    embeddings; QAT needs training and belongs to finalists), score the given split, count the bytes exactly as
    ``workers.artifacts.save`` would store them (``artifacts.size_bytes``, in memory) and time batch 1. Saving the
    artifact is optional (``save_to``): only sub-models that reach the front need one. Latency measurements must
    not overlap; the caller serialises them.
"""
from __future__ import annotations

import dataclasses
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from common.elastic_config import ElasticConfig, SubConfig, SubSpace
from common.errors import ConfigError
from common.trial_config import DistillConfig, Int4WeightOnly, MixedPrecision, QatInt8, QuantConfig, TrainConfig
from workers.data import Encoded

__all__ = ["draw", "sandwich_loss", "train_super", "SuperResult", "SubEval", "with_pruned_vocab", "evaluate_sub"]


# --------------------------------------------------------------------------- the sandwich (pure)

def draw(space: SubSpace, cfg: ElasticConfig, step: int, seed: int = 0) -> list[SubConfig]:
    """The sub-configurations optimizer step ``step`` trains: the largest and the smallest (sandwich on), then
    ``cfg.samples_per_step`` drawn uniformly per dimension. A function of its arguments only."""
    rng = random.Random(f"slimray-elastic:{seed}:{step}")  # str seeds hash the same in every process
    subs = []
    if cfg.sandwich:
        subs = [space.largest] if space.largest == space.smallest else [space.largest, space.smallest]
    for _ in range(cfg.samples_per_step):
        subs.append(SubConfig(depth=rng.choice(space.depths), heads=rng.choice(space.heads), ffn=rng.choice(space.ffn)))
    return subs


def sandwich_loss(model: nn.Module, space: SubSpace, cfg: ElasticConfig, seed: int = 0):
    """The ``step_loss`` hook of ``workers.distill.distill``: the sum of the student's loss at every
    sub-configuration ``draw`` gives for the step."""
    from workers.supernet import at

    def loss(step: int, one: Callable):
        total = 0
        for sub in draw(space, cfg, step, seed):
            with at(model, sub):
                total = total + one()
        return total

    return loss


# --------------------------------------------------------------------------- training the super-student

@dataclass(frozen=True)
class SuperResult:
    uri: str  # the trained super-student's artifact (load it with workers.supernet.load_super)
    steps: int
    seconds: float  # this call's training time (a resumed run counts only its own part)
    loss: float  # mean summed sandwich loss over the last 20 steps
    resumed_from: int  # the checkpoint step this call started from (0: a fresh start)
    size_bytes: int
    world_size: int = 1


def train_super(model: nn.Module, data: Encoded, cfg: ElasticConfig, distill_cfg: DistillConfig, train: TrainConfig,
                out_dir, *, teacher_logits: np.ndarray | None = None,
                teacher: nn.Module | None = None, progress: Callable[[int, int, float], None] | None = None,
                tokenizer=None, meta: dict | None = None) -> SuperResult:
    """Train the super-student ``model`` (from ``supernet.build_super``) in place with the sandwich rule over the
    space it was built for, on the DeepSpeed loop, for ``cfg.epochs`` (capped at ``cfg.steps``) with ``train``'s
    optimiser settings. Resumes
    from the last checkpoint under ``out_dir`` if there is one; ``progress(step, total, loss)`` follows every
    step. Saves the result (with ``tokenizer`` and ``meta``) to ``out_dir/super``; only rank 0 writes it."""
    from workers import artifacts
    from workers.distill import distill, ensure_process_group
    from workers.supernet import space_of

    out = Path(out_dir)
    space = space_of(model)
    chief = ensure_process_group()[0] == 0
    train = train.model_copy(update={"epochs": cfg.epochs, "max_steps": cfg.steps})
    trained = distill(model, data, distill_cfg, train, teacher_logits=teacher_logits, teacher=teacher,
                      callbacks=[_keep_latest(out / "checkpoints")] if chief else [],
                      checkpoint_dir=str(out / "checkpoints"), checkpoint_every=cfg.checkpoint_every, resume=True,
                      progress=progress, step_loss=sandwich_loss(model, space, cfg, seed=train.seed))
    uri, size = str((out / "super").resolve()), 0
    if chief:
        info = artifacts.save(model, tokenizer, out / "super",
                              meta={"role": "super-student", "elastic": cfg.model_dump(mode="json"),
                                    "space": space.model_dump(mode="json"), "steps": trained.steps, **(meta or {})})
        uri, size = info.uri, info.size_bytes
    return SuperResult(uri=uri, steps=trained.steps, seconds=trained.seconds, loss=trained.loss,
                       resumed_from=trained.resumed_from, size_bytes=size, world_size=trained.world_size)


def _keep_latest(directory: Path):
    """An after-step callback deleting every checkpoint but the one ``latest`` names: DeepSpeed keeps each one
    (weights and optimizer state: three times the model) and a long super-student run would fill the disk."""

    def keep_latest(step: int, total: int, model: nn.Module) -> None:
        latest = directory / "latest"
        if latest.is_file():
            keep = latest.read_text().strip()
            for old in directory.glob("global_step*"):
                if old.name != keep and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)

    return keep_latest


# --------------------------------------------------------------------------- sub-model trials

@dataclass(frozen=True)
class SubEval:
    """What a sub-model trial reads besides its sub-configuration and quantization."""

    split: Encoded  # scored: the selection split during the search
    metric: str  # accuracy | f1 | accuracy_f1
    calibration: Encoded | None = None  # training rows for static INT8 / mixed precision
    teacher_metric: float | None = None  # metric_drop is measured against it when given
    seq_len: int = 128
    latency_threads: int = 1
    latency_runs: int = 20
    vocab: object | None = None  # a workers.vocab.PrunedVocab: set by with_pruned_vocab, never by hand
    vocab_max_length: int | None = None  # positions a vocabulary-pruned model keeps (the training rows' length)


def with_pruned_vocab(ev: SubEval, tokenizer, rows: Encoded) -> SubEval:
    """``ev`` for sub-models with a pruned vocabulary (``vocab.prune``): the vocabulary of ``rows`` (the students'
    training rows, tokenised with the teacher's ``tokenizer``) with every special token and single character, the
    split tokenised again with it and the calibration rows re-numbered. Build it once per job."""
    from workers.vocab import prune_vocab, retokenise

    vocab = prune_vocab(tokenizer, rows)
    return dataclasses.replace(ev, split=retokenise(ev.split, vocab.tokenizer),
                               calibration=vocab.remap(ev.calibration) if ev.calibration is not None else None,
                               vocab=vocab, vocab_max_length=rows.max_length)


def evaluate_sub(super_model: nn.Module, sub: SubConfig, quant: QuantConfig | None, ev: SubEval, *,
                 save_to=None, tokenizer=None, meta: dict | None = None) -> dict:
    """Slice ``sub`` out of the super-student, prune its vocabulary when ``ev`` has one, quantize it as ``quant``
    says (training-free modes only), score ``ev.split``, count its bytes as saved and time batch 1. With
    ``save_to`` the artifact is written there too, with ``tokenizer`` (the pruned vocabulary's own when ``ev`` has
    one), and ``artifact_uri`` / ``artifact_bytes`` / ``sha256`` join the result. The super-student is not
    changed."""
    from workers import artifacts
    from workers.evaluate import measure
    from workers.quantize import quantize
    from workers.supernet import slice as slice_sub

    if isinstance(quant, QatInt8):
        raise ConfigError("quant.mode: qat needs training; a sub-model trial is training-free (use it for "
                          "finalists), got qat")
    t0 = time.perf_counter()
    model = slice_sub(super_model, sub)
    if ev.vocab is not None:
        from workers.vocab import reindex

        model = reindex(model, ev.vocab.kept, max_length=ev.vocab_max_length)
        tokenizer = ev.vocab.tokenizer
    if quant is not None:
        model = quantize(model, quant, calibration=ev.calibration)
    size = artifacts.size_bytes(model)
    result = measure(model, ev.split, ev.metric, seq_len=ev.seq_len, threads=ev.latency_threads,
                     runs=ev.latency_runs, batch_sizes=(1,))
    result.update(size_bytes=size, bits=_bits(quant), embedding_bits=_embedding_bits(quant),
                  vocab_tokens=model.config.vocab_size,
                  **{f"sub_{k}": v for k, v in sub.model_dump().items()})
    if ev.teacher_metric is not None:
        result["metric_drop"] = ev.teacher_metric - result["metric"]
    if save_to is not None:
        trial = {"sub": sub.model_dump(mode="json"), "vocab": {"prune": ev.vocab is not None},
                 "quant": quant.model_dump(mode="json") if quant is not None else None}
        info = artifacts.save(model, tokenizer, save_to, meta={"role": "sub-model", "trial_config": trial,
                                                                "metrics": result, **(meta or {})})
        result.update(artifact_uri=info.uri, artifact_bytes=info.artifact_bytes, sha256=info.sha256)
    result["eval_seconds"] = time.perf_counter() - t0
    return result


def _bits(quant: QuantConfig | None) -> float:
    if quant is None:
        return 32
    if isinstance(quant, Int4WeightOnly):
        return 4
    if isinstance(quant, MixedPrecision):
        return quant.bit_budget
    return 8


def _embedding_bits(quant: QuantConfig | None) -> int:
    return quant.embedding_bits if quant is not None and quant.embeddings else 32
