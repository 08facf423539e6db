"""The Tune trial function: one recipe (workers.trial.run), two launchers.

- in-process (default, single-worker CPU trials): the recipe runs inside the Tune trial actor; ~2–5 s of
  fixed cost per trial (docs/architecture.md, "Stack facts").
- Ray Train ``TorchTrainer`` (``resources.workers > 1`` or GPUs): the recipe runs on every train worker with
  DeepSpeed on Train's process group (real data parallelism); rank 0 saves and measures; ~15–25 s fixed cost.

Both report the same metrics (intermediate ``step``/``metric`` for ASHA, then the trial result) and the same
DeepSpeed checkpoints, from which a retried trial resumes.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from common.config import Frozen
from orchestrator.spec import JobSpec
from common.trial_config import TrialConfig

__all__ = ["TrialSettings", "run_trial"]


class TrialSettings(Frozen):
    """What every trial of a job shares besides the big arrays (those travel through the object store): the
    parsed job spec, and where this job's trials go."""

    spec: JobSpec
    job_id: str
    out_root: str  # artifacts: <out_root>/<trial_id>
    provenance: dict  # what every artifact records: job, dataset, task, code version

    @property
    def base(self) -> TrialConfig:
        """The spec's trial defaults; a sampled point overrides them."""
        return TrialConfig(train=self.spec.train, distill=self.spec.distill, vocab=self.spec.vocab)


def _context(bundle: dict, settings: TrialSettings, trial_id: str, report, *, is_chief=True):
    from workers.trial import TrialContext

    spec = settings.spec
    every = spec.train.eval_every
    ckpt = Path(tempfile.mkdtemp(prefix=f"slimray-ckpt-{trial_id}-"))
    return TrialContext(
        teacher_uri=bundle["teacher_uri"], teacher_metrics=bundle["teacher_metrics"], train=bundle["train"],
        eval=bundle["eval"], teacher_logits=bundle["logits"], metric=spec.task.metric,
        out_dir=str(Path(settings.out_root) / trial_id), seq_len=spec.seq_len,
        latency_threads=spec.latency.threads, latency_runs=spec.latency.runs, report=report,
        checkpoint_dir=str(ckpt) if every else None, checkpoint_every=every,
        provenance={**settings.provenance, "trial_id": trial_id}, is_chief=is_chief,
        max_size_bytes=spec.constraints.limits()["max_size_bytes"],
        select=bundle.get("select"),  # absent from a bundle a driver older than the selection split put there
    )


def _restore_checkpoint(ckpt, ctx) -> None:
    """Copy a reported checkpoint back into the trial's local checkpoint dir and ask the recipe to resume."""
    if ckpt is None or ctx.checkpoint_dir is None:
        return
    with ckpt.as_directory() as d:
        shutil.copytree(d, ctx.checkpoint_dir, dirs_exist_ok=True)
    ctx.resume = True


def _final(result: dict) -> dict:
    # Tune results must be flat numbers/strings; the step lets ASHA place the final result on its axis.
    import ray

    return {k: v for k, v in result.items() if isinstance(v, (int, float, str, bool))} | {
        "step": result.get("train_steps", 0), "final": True, "node_id": ray.get_runtime_context().get_node_id()}


def run_trial(config: dict, shared: dict, settings: TrialSettings) -> None:
    """Tune function trainable: Tune's flat sampled ``config`` becomes a TrialConfig here, at the boundary (a
    bad point fails before any model work), and the recipe runs with the launcher it needs."""
    import ray
    from ray import tune

    from search.adapters import trial_config

    cfg = trial_config(config, settings.base)
    trial_id = tune.get_context().get_trial_id() or "trial"
    if settings.spec.resources.distributed:
        _fit_with_train(cfg, shared, settings, trial_id)
        return

    from ray.tune import Checkpoint

    from workers.trial import run

    bundle = ray.get(shared["ref"])

    def report(metrics, checkpoint_dir):
        tune.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    ctx = _context(bundle, settings, trial_id, report)
    _restore_checkpoint(tune.get_checkpoint(), ctx)
    try:
        result = run(cfg, ctx)
    finally:
        if ctx.checkpoint_dir:
            shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    tune.report(_final(result))


def _train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed reuses Train's process group (no ports to pick)."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from workers.trial import run

    settings: TrialSettings = loop_config["settings"]
    ctx_train = ray.train.get_context()
    rank = ctx_train.get_world_rank()
    bundle = ray.get(loop_config["shared"]["ref"])

    def report(metrics, checkpoint_dir):  # every rank calls it: ray.train.report is a barrier
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    ctx = _context(bundle, settings, loop_config["trial_id"], report, is_chief=rank == 0)
    _restore_checkpoint(ray.train.get_checkpoint(), ctx)
    os.environ.setdefault("LOCAL_RANK", str(ctx_train.get_local_rank()))
    result = run(loop_config["trial"], ctx)
    ray.train.report(_final(result) if rank == 0 else {"step": result.get("train_steps", 0)})


def _fit_with_train(cfg: TrialConfig, shared: dict, settings: TrialSettings, trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    storage = Path(settings.out_root).parent / "train"
    resources = settings.spec.resources
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"trial": cfg, "shared": shared, "settings": settings, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.workers, use_gpu=resources.gpus > 0,
            resources_per_worker={"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"{trial_id}", storage_path=str(storage), callbacks=[TuneReportCallback()],
            # unplaceable workers would make Train retry forever without a limit
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()
