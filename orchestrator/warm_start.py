"""Which earlier jobs seed a new job's searcher (``search.warm_start``), and with which of their trials.

A source shares the new job's teacher (the same prepared teacher, named by its cache key) and task; of its
trials, those that ended with every objective measured and whose config lies inside the new space
(:func:`search.warmstart.flat_params`) become points the searcher starts from.
"""
from __future__ import annotations

import math
from pathlib import PurePosixPath

from common.errors import SpecError
from orchestrator.spec import JobSpec, from_stored
from common.trial_config import TrialConfig

__all__ = ["check_sources", "gather"]


def check_sources(store, spec: JobSpec) -> None:
    """Refuse job ids the store does not know, before anything starts."""
    ids = spec.search.warm_start
    if not ids or ids == "auto":
        return
    known = {job["id"] for job in store.list_jobs(limit=1_000_000)}
    missing = [j for j in ids if j not in known]
    if missing:
        raise SpecError([f"search.warm_start: no job {', '.join(map(repr, missing))} in the store; see "
                         f"`slimray jobs`, or use auto"])


def _teacher_name(uri: str | None) -> str | None:
    return PurePosixPath(uri).name if uri else None


def _same_task(job: dict, spec: JobSpec) -> bool:
    try:
        return from_stored(job["spec"]).task == spec.task
    except SpecError:  # a spec this version cannot read cannot be compared
        return False


def gather(store, spec: JobSpec, job_id: str, teacher_uri: str) -> tuple[list[str], list[tuple[dict, list]]]:
    """(the source jobs that gave at least one point, ``(flat params, objective values)`` points)."""
    from search.warmstart import flat_params

    wanted = spec.search.warm_start
    explicit = wanted != "auto"
    jobs = [j for j in store.list_jobs(limit=1_000_000) if j["id"] != job_id and (not explicit or j["id"] in wanted)]
    base = TrialConfig(train=spec.train, distill=spec.distill)
    names = [o.name for o in spec.objectives]
    sources, points = [], []
    for job in sorted(jobs, key=lambda j: j["created_at"] or ""):
        same_teacher = _teacher_name((job.get("baseline") or {}).get("uri")) == _teacher_name(teacher_uri)
        if not (same_teacher and _same_task(job, spec)):
            if explicit:
                raise SpecError([f"search.warm_start: job {job['id']!r} ran another "
                                 f"{'task' if same_teacher else 'teacher'}; list jobs of this teacher and task, "
                                 f"or use auto"])
            continue
        found = 0
        for trial in store.trials(job["id"]):
            if trial["status"] not in ("terminated", "stopped_early") or (trial["result"] or {}).get("infeasible"):
                continue
            values = [trial.get(n) if trial.get(n) is not None else (trial["result"] or {}).get(n) for n in names]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                continue
            params = flat_params(trial["config"], spec.search, base)
            if params is not None:
                points.append((params, [float(v) for v in values]))
                found += 1
        if found or explicit:
            sources.append(job["id"])
    return sources, points
