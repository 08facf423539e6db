"""submit / resume / cancel a search job: the spine of docs/architecture.md, wired together.

    submit(spec) → Job row → Ray (embedded or --address) → teacher prepared once (a Ray task) → its data and
    logits put in the object store → Tuner(run_trial, searcher, ASHA, Recorder) → Pareto front → Job finished
"""
from __future__ import annotations

import logging
import os
import secrets
import time
from pathlib import Path

from orchestrator.spec import JobSpec, from_stored
from common.errors import SlimrayError
from common.paths import home, open_store
from common.raylink import connect

__all__ = ["submit", "resume", "cancel", "new_job_id", "compute_front"]

log = logging.getLogger(__name__)


def new_job_id(name: str) -> str:
    return f"{name}-{time.strftime('%m%d%H%M')}-{secrets.token_hex(2)}"


def _artifact_root(spec: JobSpec, job_id: str) -> Path:
    root = Path(spec.storage.artifact_dir).expanduser() if spec.storage.artifact_dir else home() / "jobs"
    return (root / job_id).resolve()


def teacher_cache_dir(spec: JobSpec) -> Path:
    """Where prepared teachers are kept: shared by every job with the same artifact root."""
    return _artifact_root(spec, "teachers")


def prepare_teacher(spec: JobSpec, cache_dir: Path, *, progress=None, on_stage=None):
    """(the job's teacher, its task data): fine-tuned on every training row, or ``teacher_train.train_size``
    of them, while ``task.train_size`` limits only the students' rows; reused when already prepared. Both loads
    carve the same selection split out first (``workers.data.load``), so the teacher never trains on it."""
    from workers.data import load
    from workers.teacher import prepare

    data = load(spec.task)
    size = spec.teacher_train.train_size
    rows = data.train if size == spec.task.train_size else load(spec.task.model_copy(update={"train_size": size})).train
    teacher = prepare(spec.teacher, data, spec.teacher_train, cache_dir, teacher_rows=rows,
                      latency_threads=spec.latency.threads, latency_runs=spec.latency.runs, progress=progress,
                      on_stage=on_stage)
    return teacher, data


class TeacherProgress:
    """Writes the teacher stage's progress (or ``stage``'s: the elastic super-student's) to the job row, at most
    every ``every_s`` seconds, so that `slimray status` can say what it is doing while the driver waits on the
    Ray task."""

    def __init__(self, db_url: str, job_id: str, every_s: float = 2.0, stage: str = "teacher"):
        self.db_url, self.job_id, self.every_s, self.stage_name = db_url, job_id, every_s, stage
        self._store, self._last, self._what = None, 0.0, "starting"

    def _write(self, progress: dict, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        try:
            if self._store is None:
                self._store = open_store(self.db_url)
            self._store.set_job_stage(self.job_id, self.stage_name, progress)
        except SlimrayError as err:  # progress is a courtesy: never fail the stage over it
            log.warning("%s progress not recorded: %s", self.stage_name, err)

    def stage(self, what: str) -> None:
        self._what = what
        self._write({"what": what}, force=True)

    def step(self, step: int, total: int, loss: float) -> None:
        self._write({"what": self._what, "done": step, "total": total, "unit": "steps"}, force=step == total)


def _prepare_teacher(spec: JobSpec, cache_dir: Path, report: TeacherProgress | None = None) -> dict:
    """Runs as a Ray task so that, on a cluster, the teacher trains on a worker node, not the driver."""
    t, data = prepare_teacher(spec, cache_dir, progress=report and report.step, on_stage=report and report.stage)
    return {"teacher_uri": t.uri, "teacher_metrics": t.metrics, "train": t.train, "eval": t.eval,
            "logits": t.train_logits, "dataset": data.source, "teacher_key": t.key, "augmented_rows": t.augmented,
            "select": t.select}


def checkpoint_period(num_trials: int) -> float:
    """Seconds between Tune's snapshots of the search state. A snapshot serialises every trial (about a
    millisecond each, bench/scale.py), so a fixed short period would spend a growing share of the driver on
    it: 2 s (a killed driver loses little) up to 100 trials, then 20 ms per trial (≤ ~5% of the driver)."""
    return max(2.0, 0.02 * num_trials)


# A period the user set in the environment wins over checkpoint_period.
_USER_CHECKPOINT_S = os.environ.get("TUNE_GLOBAL_CHECKPOINT_S")


def _tuner(spec: JobSpec, job_id: str, store_url: str, shared: dict, settings, restore_path: str | None,
           trial_fn, warm: list):
    from ray import tune

    from orchestrator.recorder import Recorder
    from orchestrator.stopper import CancelStopper
    from search.algorithms import make, param_space_for

    resources = {"cpu": spec.resources.cpus, "gpu": spec.resources.gpus}
    if spec.resources.distributed:  # the trial actor only drives the TorchTrainer; its workers hold the CPUs
        resources = {"cpu": 0.01}
    trainable = tune.with_resources(tune.with_parameters(trial_fn, shared=shared, settings=settings), resources)
    if restore_path:
        return tune.Tuner.restore(restore_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    search_alg, scheduler = make(spec.search, spec.algorithm, spec.objectives,
                                 max_concurrent=spec.budget.max_concurrent, num_trials=spec.budget.num_trials)
    if warm:
        from search.warmstart import seed

        log.info("warm start: %d earlier trials seed the searcher", seed(search_alg, spec.search, warm))
    root = _artifact_root(spec, job_id)
    return tune.Tuner(
        trainable,
        param_space=param_space_for(spec.search, spec.algorithm),
        tune_config=tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=spec.budget.num_trials,
                                    time_budget_s=spec.budget.time_budget_s,
                                    # a new actor per trial costs ~2 s (docs/architecture.md); reused actors keep their one
                                    # DeepSpeed process group alive (distill.ensure_process_group)
                                    reuse_actors=not spec.resources.distributed),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(root), verbose=0,
            callbacks=[Recorder(store_url, job_id, settings.base)],
            stop=CancelStopper(store_url, job_id),
            failure_config=tune.FailureConfig(max_failures=spec.budget.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),  # 1 forces a state snapshot per checkpoint
        ),
    )


def close_unfinished(store, job_id: str) -> list[str]:
    """Once the search is over, a trial still running in the store was cut short by the time budget: record it
    stopped early, with its last report as its result. Returns those trial ids."""
    cut = []
    for t in store.trials(job_id):
        if t["status"] in ("running", "pending"):
            history = store.metric_history(job_id, t["trial_id"])
            last = dict(history[-1]["values"]) if history else {}
            store.trial_finished(job_id, t["trial_id"], "stopped_early", {**last, "stopped_by": "the search's end"})
            cut.append(t["trial_id"])
    return cut


def compute_front(store, job_id: str, spec: JobSpec) -> list[str]:
    """Flag the non-dominated finished trials of ``job_id`` on the spec's objectives; returns their ids."""
    from search.pareto import front

    done = [t for t in store.trials(job_id, status="terminated")
            if all(t.get(o.name) is not None for o in spec.objectives)]
    values = [[float(t[o.name]) for o in spec.objectives] for t in done]
    ids = [done[i]["trial_id"] for i in front(values, [o.mode for o in spec.objectives])] if done else []
    store.set_front(job_id, ids)
    return ids


def _run(job_id: str, spec: JobSpec, store, *, restore_path: str | None = None, progress=None, trainable=None,
         prepare=None) -> str:
    """The job's life on Ray. ``trainable`` (a ``run_trial``-shaped function) and ``prepare`` (a
    ``_prepare_teacher``-shaped one) replace the real trial and teacher: the scale benchmark and its test drive
    this very loop with cheap, sleep-bound trials."""
    import ray

    from orchestrator.trainable import TrialSettings, run_trial
    from workers.teacher import code_version

    root = _artifact_root(spec, job_id)
    root.mkdir(parents=True, exist_ok=True)
    # Intermediate reports carry the step and metric for ASHA; size and latency exist only once the artifact
    # does, so Tune must not insist that every report names every objective.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = _USER_CHECKPOINT_S or f"{checkpoint_period(spec.budget.num_trials):g}"
    connect(spec.ray_address, dashboard=spec.resources.distributed)
    store.set_job_status(job_id, "running")
    store.set_job_tune_path(job_id, str(root / "tune"))
    try:
        store.set_job_stage(job_id, "teacher")
        cache = teacher_cache_dir(spec)
        # a trial's resources: Ray gives the task as many torch threads as CPUs, and nothing else runs yet
        prep = ray.remote(num_cpus=spec.resources.cpus, num_gpus=spec.resources.gpus)(prepare or _prepare_teacher)
        task = prep.remote(spec, cache) if prepare else prep.remote(spec, cache, TeacherProgress(store.url, job_id))
        bundle = ray.get(task)
        store.set_job_baseline(job_id, {**bundle["teacher_metrics"], "uri": bundle["teacher_uri"]})
        restore_path = restore_path if restore_path and Path(restore_path).exists() else None
        warm = []
        if spec.search.warm_start and not restore_path:  # a restored searcher keeps what it was seeded with
            from orchestrator.warm_start import gather

            sources, warm = gather(store, spec, job_id, bundle["teacher_uri"])
            store.set_job_warm_sources(job_id, sources)
        shared = {"ref": ray.put(bundle)}  # wrapped in a dict: with_parameters would resolve a bare ref
        settings = TrialSettings(
            spec=spec, job_id=job_id, out_root=str(root / "trials"),
            provenance={"job_id": job_id, "dataset": bundle["dataset"], "task": spec.task.model_dump(mode="json"),
                        "code_version": code_version()})
        trial_fn, unit, before = trainable or run_trial, "trials", 0
        if spec.strategy == "elastic":  # docs/architecture.md, "The elastic strategy"
            from orchestrator.elastic_stage import run_sub_trial, super_stage

            shared["super_uri"] = super_stage(spec, job_id, store, shared["ref"], root, settings.provenance)
            trial_fn, unit, before = trainable or run_sub_trial, "sub-models", 1  # the super-student's row
        tuner = _tuner(spec, job_id, store.url, shared, settings, restore_path, trial_fn, warm)
        store.set_job_stage(job_id, "search", {"done": 0, "total": spec.budget.num_trials, "unit": unit,
                                               "before": before})
        tuner.fit()
        store.set_job_stage(job_id, "front")
        close_unfinished(store, job_id)
        compute_front(store, job_id, spec)
        if spec.strategy == "elastic" and store.get_job(job_id)["status"] != "cancelled":
            from orchestrator.elastic_stage import after_search

            after_search(spec, job_id, store, shared, settings)
        store.set_job_stage(job_id, "done")
        if store.get_job(job_id)["status"] != "cancelled":
            store.set_job_status(job_id, "finished")
    except KeyboardInterrupt:
        store.set_job_status(job_id, "interrupted", error="interrupted by the user; `slimray resume` continues it")
        raise
    except BaseException as err:
        store.set_job_status(job_id, "failed", error=(str(err).splitlines() or [type(err).__name__])[0][:500])
        raise
    return job_id


def submit(spec: JobSpec, *, address: str | None = None, job_id: str | None = None, detach: bool = False,
           store=None) -> str:
    """Run a search job to completion (or hand it to the cluster with ``detach``); returns the job id. ``spec``
    is parsed once, by the caller (``orchestrator.spec.load``), and travels as is to the trials."""
    from workers.teacher import code_version

    if not isinstance(spec, JobSpec):
        raise SlimrayError(f"submit takes a parsed JobSpec (orchestrator.spec.load / parse), got "
                           f"{type(spec).__name__}")
    if address:
        spec = spec.model_copy(update={"ray_address": address})
    job_id = job_id or new_job_id(spec.name)
    if detach:
        from orchestrator.detach import submit_detached

        return submit_detached(spec, job_id)
    store = store or open_store(spec.storage.db_url)
    from orchestrator.warm_start import check_sources

    check_sources(store, spec)
    store.create_job(job_id, spec.name, spec.stored(), teacher=spec.teacher, dataset=spec.task.dataset,
                     code_version=code_version())
    return _run(job_id, spec, store)


def resume(job_id: str, *, address: str | None = None, store=None) -> str:
    """Continue an interrupted or failed job from Tune's saved state; finished trials are not rerun."""
    store = store or open_store()
    job = store.get_job(job_id)
    if job["status"] == "finished":
        raise SlimrayError(f"job {job_id} already finished; see `slimray results {job_id}`")
    spec = from_stored(job["spec"])
    if address:
        spec = spec.model_copy(update={"ray_address": address})
    return _run(job_id, spec, store, restore_path=job.get("tune_path"))


def cancel(job_id: str, *, store=None) -> None:
    """Ask a running job to stop: its driver sees the flag within seconds and stops every trial."""
    store = store or open_store()
    job = store.get_job(job_id)
    if job["status"] in ("finished", "failed", "cancelled"):
        raise SlimrayError(f"job {job_id} is already {job['status']}")
    store.set_job_status(job_id, "cancelled", error="cancelled by the user")
