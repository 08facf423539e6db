"""Artifact retention: `slimray gc JOB` keeps the models a user may still promote and deletes the rest.

Kept: the job's Pareto front (recomputed here with search.pareto on the spec's objectives, and whatever the store
already flags on_front), the ``keep_top`` trials with the highest task metric, and any trial that is serving
now. Every other trial's artifact directory is removed; its row and metrics stay, marked ``artifact_deleted``
(promotion then refuses it). The rows are marked before the files go, so a gc cut short is finished by
running it again.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from common.errors import SlimrayError

__all__ = ["GcResult", "gc"]

_ARTIFACT_FILES = ("slimray.json", "model.safetensors")  # what makes a directory one of our artifacts


@dataclass(frozen=True)
class GcResult:
    kept: tuple[str, ...]  # trial ids whose artifacts stay
    deleted: tuple[str, ...]  # trial ids whose artifacts were removed by this run
    freed_bytes: int


def _front(trials: list[dict], objectives) -> set[str]:
    from search.pareto import front

    done = [t for t in trials if t["status"] == "terminated" and all(t.get(o.name) is not None for o in objectives)]
    values = [[float(t[o.name]) for o in objectives] for t in done]
    return {done[i]["trial_id"] for i in front(values, [o.mode for o in objectives])} if done else set()


def _top(trials: list[dict], k: int) -> set[str]:
    scored = [t for t in trials if t["status"] == "terminated" and t.get("metric") is not None]
    return {t["trial_id"] for t in sorted(scored, key=lambda t: -t["metric"])[:k]}


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def gc(job_id: str, *, keep_top: int = 3, store=None, dry_run: bool = False) -> GcResult:
    """Delete the artifacts of ``job_id``'s trials that are neither on its front, nor among the ``keep_top``
    best by metric, nor serving; returns what was kept and removed (``dry_run``: what would be removed)."""
    from common.paths import open_store
    from orchestrator.spec import from_stored
    from workers.artifacts import resolve

    if not isinstance(keep_top, int) or isinstance(keep_top, bool) or keep_top < 0:
        raise SlimrayError(f"--keep-top: must be an integer ≥ 0, got {keep_top!r}")
    store = store or open_store()
    job = store.get_job(job_id)
    if job["status"] in ("pending", "running"):
        raise SlimrayError(f"job {job_id} is {job['status']}: its front is not settled yet; run gc once it ends")
    trials = store.trials(job_id)
    serving = {d["trial_id"] for d in store.deployments(job_id) if d["status"] == "live"}
    keep = (_front(trials, from_stored(job["spec"]).objectives) | {t["trial_id"] for t in trials if t["on_front"]}
            | _top(trials, keep_top) | serving)
    doomed = [t for t in trials if t["trial_id"] not in keep and t.get("artifact_uri")]
    # rows already marked by an earlier, interrupted gc may still have files: remove those too
    dirs = {t["trial_id"]: resolve(t["artifact_uri"]) for t in doomed}
    for tid, path in dirs.items():
        if path.exists() and not any((path / f).is_file() for f in _ARTIFACT_FILES):
            raise SlimrayError(f"trial {tid} of job {job_id}: {path} does not look like a slimray artifact "
                               f"(no {' or '.join(_ARTIFACT_FILES)}); refusing to delete it")
    present = {tid: path for tid, path in dirs.items() if path.is_dir()}
    freed = sum(_bytes(p) for p in present.values())
    fresh = tuple(t["trial_id"] for t in doomed if not t.get("artifact_deleted"))
    if not dry_run:
        store.set_artifacts_deleted(job_id, fresh)
        for path in present.values():
            shutil.rmtree(path)
    kept = tuple(t["trial_id"] for t in trials if t["trial_id"] in keep and t.get("artifact_uri"))
    return GcResult(kept=kept, deleted=tuple(dict.fromkeys(fresh + tuple(present))), freed_bytes=freed)
