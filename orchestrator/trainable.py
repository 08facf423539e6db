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
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TrialSettings", "run_trial", "trial_config"]


@dataclass(frozen=True)
class TrialSettings:
    """What every trial of a job shares besides the big arrays (those travel through the object store)."""

    job_id: str
    base: dict  # trial-config defaults from the spec (train, distill); the sampled point overrides them
    out_root: str  # artifacts: <out_root>/<trial_id>
    metric: str
    seq_len: int
    latency_threads: int = 1
    latency_runs: int = 20
    workers: int = 1
    cpus: float = 1
    gpus: float = 0
    checkpoint_every: int = 0
    provenance: dict = field(default_factory=dict)

    @property
    def distributed(self) -> bool:
        return self.workers > 1 or self.gpus > 0


def _merge(base: dict, over: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def trial_config(flat: dict, base: dict) -> dict:
    """The full nested trial config for Tune's flat sampled ``flat`` on top of the spec's defaults."""
    from search.space import to_trial_config

    return _merge(base, to_trial_config(flat))


def _context(cfg_dict: dict, bundle: dict, settings: TrialSettings, trial_id: str, report, *, is_chief=True):
    from workers.trial import TrialContext

    ckpt = Path(tempfile.mkdtemp(prefix=f"slimray-ckpt-{trial_id}-"))
    return TrialContext(
        teacher_uri=bundle["teacher_uri"], teacher_metrics=bundle["teacher_metrics"], train=bundle["train"],
        eval=bundle["eval"], teacher_logits=bundle["logits"], metric=settings.metric,
        out_dir=str(Path(settings.out_root) / trial_id), seq_len=settings.seq_len,
        latency_threads=settings.latency_threads, latency_runs=settings.latency_runs, report=report,
        checkpoint_dir=str(ckpt) if settings.checkpoint_every else None, checkpoint_every=settings.checkpoint_every,
        provenance={**settings.provenance, "trial_id": trial_id}, is_chief=is_chief,
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
    """Tune function trainable: builds the trial config and runs the recipe with the launcher it needs."""
    import ray
    from ray import tune

    from workers.configs import TrialConfig

    cfg_dict = trial_config(config, settings.base)
    TrialConfig.from_dict(cfg_dict)  # fail fast on a bad point, before any model work
    trial_id = tune.get_context().get_trial_id() or "trial"
    if settings.distributed:
        _fit_with_train(cfg_dict, shared, settings, trial_id)
        return

    from ray.tune import Checkpoint

    from workers.trial import run

    bundle = ray.get(shared["ref"])

    def report(metrics, checkpoint_dir):
        tune.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    ctx = _context(cfg_dict, bundle, settings, trial_id, report)
    _restore_checkpoint(tune.get_checkpoint(), ctx)
    try:
        result = run(TrialConfig.from_dict(cfg_dict), ctx)
    finally:
        if ctx.checkpoint_dir:
            shutil.rmtree(ctx.checkpoint_dir, ignore_errors=True)
    tune.report(_final(result))


def _train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: DeepSpeed reuses Train's process group (no ports to pick)."""
    import ray
    import ray.train
    from ray.train import Checkpoint

    from workers.configs import TrialConfig
    from workers.trial import run

    settings: TrialSettings = loop_config["settings"]
    ctx_train = ray.train.get_context()
    rank = ctx_train.get_world_rank()
    bundle = ray.get(loop_config["shared"]["ref"])

    def report(metrics, checkpoint_dir):  # every rank calls it: ray.train.report is a barrier
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None)

    ctx = _context(loop_config["trial"], bundle, settings, loop_config["trial_id"], report, is_chief=rank == 0)
    _restore_checkpoint(ray.train.get_checkpoint(), ctx)
    os.environ.setdefault("LOCAL_RANK", str(ctx_train.get_local_rank()))
    result = run(TrialConfig.from_dict(loop_config["trial"]), ctx)
    ray.train.report(_final(result) if rank == 0 else {"step": result.get("train_steps", 0)})


def _fit_with_train(cfg_dict: dict, shared: dict, settings: TrialSettings, trial_id: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    storage = Path(settings.out_root).parent / "train"
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"trial": cfg_dict, "shared": shared, "settings": settings, "trial_id": trial_id},
        scaling_config=ray.train.ScalingConfig(
            num_workers=settings.workers, use_gpu=settings.gpus > 0,
            resources_per_worker={"CPU": settings.cpus, **({"GPU": settings.gpus} if settings.gpus else {})}),
        run_config=ray.train.RunConfig(
            name=f"{trial_id}", storage_path=str(storage), callbacks=[TuneReportCallback()],
            # unplaceable workers would make Train retry forever without a limit
            failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()
