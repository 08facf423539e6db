"""Knowledge distillation: the losses and the training loop on the DeepSpeed engine.

The loop also fine-tunes teachers (no teacher signal: plain cross-entropy) so there is one loop to trust.
Batches come from ``workers.batching`` (length-grouped by default, so a batch is padded only to about its own
rows' length); data parallelism comes from the process group: each rank takes its share of every batch, and
DeepSpeed averages the gradients.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workers.augment import NO_LABEL
from workers.batching import batches_per_epoch, epoch_batches, rank_share
from common.trial_config import DistillConfig, TrainConfig
from workers.data import Encoded
from common.ports import free_port

__all__ = ["kd_loss", "hidden_loss", "attention_loss", "distill", "DistillResult", "layer_map",
           "ensure_process_group", "StepCallback", "StepLoss"]

StepCallback = Callable[[int, int, nn.Module], None]  # (step, total_steps, student) after each optimizer step
# (optimizer step being trained, a function returning the student's loss on this batch as the student is now) ->
# the loss to train on; the elastic super-student (workers.elastic) sums it over the step's sub-configurations
StepLoss = Callable[[int, Callable[[], torch.Tensor]], torch.Tensor]


# --------------------------------------------------------------------------- losses

def kd_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """alpha * T² * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, labels) (Hinton et al., 2015).
    The T² keeps the soft term's gradients on the same scale as the hard term's when T changes. Rows labelled
    ``augment.NO_LABEL`` (augmented copies) take part only in the soft term."""
    labelled = labels != NO_LABEL
    # cross_entropy's mean over no rows is NaN: a batch of augmented rows only has a soft term
    ce = F.cross_entropy(student_logits, labels) if labelled.any() else student_logits.sum() * 0
    if teacher_logits is None or alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  reduction="batchmean", log_target=True) * t * t
    return alpha * kl + (1 - alpha) * ce


def layer_map(n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """Pairs of hidden-state indices (0 = embeddings): student layer j ↔ teacher layer round(j·n_t/n_s)."""
    return [(j, round(j * n_teacher / n_student)) for j in range(n_student + 1)]


def hidden_loss(student_hidden, teacher_hidden, mask, proj: nn.Module | None) -> torch.Tensor:
    """Mean-squared error between mapped hidden states over real (non-padding) tokens."""
    pairs = layer_map(len(student_hidden) - 1, len(teacher_hidden) - 1)
    m = mask.unsqueeze(-1).to(student_hidden[0].dtype)
    total = 0.0
    for j, i in pairs:
        s = student_hidden[j] if proj is None else proj(student_hidden[j])
        total = total + (((s - teacher_hidden[i]) ** 2) * m).sum() / (m.sum() * s.shape[-1])
    return total / len(pairs)


def attention_loss(student_attn, teacher_attn, mask) -> torch.Tensor:
    """KL between head-averaged attention maps of mapped layers (head counts may differ after pruning)."""
    pairs = layer_map(len(student_attn), len(teacher_attn))[1:]
    total = 0.0
    rows = mask.to(student_attn[0].dtype)
    for j, i in pairs:
        s = student_attn[j - 1].mean(1).clamp_min(1e-9).log()
        t = teacher_attn[i - 1].mean(1)
        kl = (t * (t.clamp_min(1e-9).log() - s)).sum(-1)  # [batch, query]
        total = total + (kl * rows).sum() / rows.sum()
    return total / len(pairs)


# --------------------------------------------------------------------------- the engine


def ensure_process_group() -> tuple[int, int]:
    """(rank, world_size); a single-process gloo group on loopback when none exists (DeepSpeed needs one).
    The group is kept for the process's life: DeepSpeed caches groups and a re-created one is rejected."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if os.environ.get("WORLD_SIZE", "1") == "1":
            # A single process: its own group on a fresh loopback port. Inherited MASTER_* variables (a parent
            # that trained earlier, a Ray worker spawned from it) would point at a port already taken.
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                              LOCAL_RANK="0")
        else:  # launched by a multi-process launcher: its settings rule
            os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl",
                                   verbose=False)
    return dist.get_rank(), dist.get_world_size()


def _precision(train: TrainConfig) -> str:
    if train.precision != "auto":
        return train.precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def _ds_config(train: TrainConfig, world: int) -> dict:
    prec = _precision(train)
    return {
        "train_micro_batch_size_per_gpu": train.batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.batch_size * train.grad_accum * world,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": prec == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }


class _DistillModule(nn.Module):
    """What DeepSpeed trains: the student plus, when widths differ, the hidden-state projection."""

    def __init__(self, student: nn.Module, proj: nn.Module | None, step_loss: StepLoss | None = None):
        super().__init__()
        self.student, self.proj, self.step_loss = student, proj, step_loss

    def forward(self, batch, t_logits, t_out, cfg: DistillConfig, step: int = 0):
        if self.step_loss is None:
            return self._loss(batch, t_logits, t_out, cfg)
        return self.step_loss(step, lambda: self._loss(batch, t_logits, t_out, cfg))

    def _loss(self, batch, t_logits, t_out, cfg: DistillConfig):
        want_hidden = cfg.hidden_weight > 0 and t_out is not None
        want_attn = cfg.attention_weight > 0 and t_out is not None
        out = self.student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"], output_hidden_states=want_hidden,
                           output_attentions=want_attn)
        loss = kd_loss(out.logits, t_logits, batch["labels"], cfg.temperature, cfg.alpha if t_logits is not None else 0)
        if want_hidden:
            loss = loss + cfg.hidden_weight * hidden_loss(out.hidden_states, t_out.hidden_states,
                                                          batch["attention_mask"], self.proj)
        if want_attn:
            loss = loss + cfg.attention_weight * attention_loss(out.attentions, t_out.attentions,
                                                                batch["attention_mask"])
        return loss


@dataclass
class DistillResult:
    steps: int
    seconds: float
    loss: float  # mean training loss over the last 20 steps
    resumed_from: int = 0
    world_size: int = 1  # data-parallel ranks that trained


def _total_steps(n_batches: int, train: TrainConfig) -> int:
    steps = max(1, math.ceil(train.epochs * n_batches / train.grad_accum))
    return min(steps, train.max_steps) if train.max_steps else steps


def distill(student: nn.Module, data: Encoded, cfg: DistillConfig, train: TrainConfig, *,
            teacher_logits: np.ndarray | None = None, teacher: nn.Module | None = None,
            callbacks: Sequence[StepCallback] = (), checkpoint_dir: str | None = None,
            checkpoint_every: int = 0, resume: bool = False, progress: Callable[[int, int, float], None] | None = None,
            step_loss: StepLoss | None = None) -> DistillResult:
    """Train ``student`` in place on ``data`` with the distillation loss, on the DeepSpeed engine.

    Teacher signal: ``teacher_logits`` (cached, one row per training example) when given, otherwise the
    ``teacher`` model is run on every batch; with neither it is plain fine-tuning. Hidden-state and
    attention losses always need the ``teacher`` model. ``callbacks`` run after every optimizer step
    (pruning masks, intermediate evaluation). With ``checkpoint_dir`` the engine state is saved every
    ``checkpoint_every`` steps and, with ``resume``, training continues from the last checkpoint. ``step_loss``
    replaces the loss of each batch (see :data:`StepLoss`).
    """
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    rank, world = ensure_process_group()
    torch.manual_seed(train.seed)
    needs_teacher_out = (cfg.hidden_weight > 0 or cfg.attention_weight > 0)
    if needs_teacher_out and teacher is None:
        raise ValueError("distill: hidden_weight/attention_weight need the teacher model")
    if needs_teacher_out and cfg.attention_weight > 0:
        student.config._attn_implementation = "eager"  # attention maps are only returned by eager attention
        if teacher is not None:
            teacher.config._attn_implementation = "eager"
    proj = None
    if needs_teacher_out and cfg.hidden_weight > 0 and teacher.config.hidden_size != student.config.hidden_size:
        proj = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)

    module = _DistillModule(student, proj, step_loss)
    module.train()
    n_batches = batches_per_epoch(len(data), train.batch_size, world)
    total = _total_steps(n_batches, train)
    warmup = int(train.warmup_ratio * total)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=train.lr,
                            weight_decay=train.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warmup) if s < warmup else max(0.0, (total - s) / max(1, total - warmup)))
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=opt, lr_scheduler=sched,
                                           config=_ds_config(train, world))
    device = engine.device
    if teacher is not None:
        teacher.to(device).eval()

    step = 0
    if resume and checkpoint_dir and (Path(checkpoint_dir) / "latest").exists():
        _, state = engine.load_checkpoint(checkpoint_dir)
        step = int((state or {}).get("step", 0))
    start_step, t0, losses = step, time.perf_counter(), []
    group = getattr(train, "group_by_length", True)
    micro = step * train.grad_accum  # micro-batches done, so a resumed run continues the same data order
    batches, batches_epoch = [], -1
    while step < total:
        epoch, pos = divmod(micro, n_batches)
        if epoch != batches_epoch:
            batches, batches_epoch = epoch_batches(data.lengths, train.batch_size, world, train.seed, epoch,
                                                   group_by_length=group), epoch
        idx = rank_share(batches[pos], rank, world)
        batch = {k: v.to(device) for k, v in data.batch(idx).items()}  # padded to this batch's longest row
        t_logits, t_out = None, None
        if teacher_logits is not None and cfg.alpha > 0:
            t_logits = torch.from_numpy(np.asarray(teacher_logits[idx], dtype=np.float32)).to(device)
        if teacher is not None and (needs_teacher_out or (t_logits is None and cfg.alpha > 0)):
            with torch.no_grad():
                t_out = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                token_type_ids=batch["token_type_ids"], output_hidden_states=cfg.hidden_weight > 0,
                                output_attentions=cfg.attention_weight > 0)
            if t_logits is None:
                t_logits = t_out.logits.float()
        loss = engine(batch, t_logits, t_out, cfg, step)
        engine.backward(loss)
        engine.step()
        micro += 1
        losses.append(loss.item())
        if micro % train.grad_accum == 0:
            step += 1
            # the checkpoint comes first so a callback that reports it hands over this step's state
            if checkpoint_dir and checkpoint_every and (step % checkpoint_every == 0 or step == total):
                engine.save_checkpoint(checkpoint_dir, client_state={"step": step})
            for cb in callbacks:
                cb(step, total, student)
            if progress is not None:
                progress(step, total, float(np.mean(losses[-20:])))
    student.eval()
    return DistillResult(steps=step, seconds=time.perf_counter() - t0,
                         loss=float(np.mean(losses[-20:])) if losses else float("nan"), resumed_from=start_step,
                         world_size=world)
