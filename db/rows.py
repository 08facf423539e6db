"""ORM rows out as plain, JSON-friendly dicts; caller values in as plain JSON.

Callers never hold ORM objects: a dict cannot lazy-load after its session
closed, and it goes straight into ``json.dumps`` for the CLI.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Optional

from .models import Deployment, Job, Trial

__all__ = ["plain_json", "number", "iso", "job_dict", "trial_dict", "deployment_dict", "RESULT_COLUMNS"]

# Result keys copied into first-class trial columns, with the type each column holds.
RESULT_COLUMNS = {
    "metric": float, "metric_drop": float, "size_bytes": int, "params": int,
    "latency_ms_b1": float, "latency_ms_b32": float, "train_seconds": float,
}


def plain_json(value: Any) -> Any:
    """``value`` made storable as strict JSON on every backend.

    Trials report NumPy/torch scalars, and a diverged run reports NaN, which
    PostgreSQL's JSON type rejects; NaN and infinities become None.
    """
    if isinstance(value, dict):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if hasattr(value, "item"):  # NumPy and torch scalars
        return plain_json(value.item())
    return str(value)


def number(value: Any, kind: type) -> Optional[float | int]:
    value = plain_json(value)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return kind(value)


def iso(moment: Optional[datetime]) -> Optional[str]:
    if moment is None:
        return None
    # SQLite hands back naive datetimes; everything is stored in UTC.
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.isoformat()


def job_dict(job: Job, trial_counts: dict[str, int]) -> dict[str, Any]:
    return {
        "id": job.id, "name": job.name, "status": job.status, "spec": job.spec,
        "teacher": job.teacher, "dataset": job.dataset, "baseline": job.baseline,
        "tune_path": job.tune_path, "code_version": job.code_version, "error": job.error,
        "created_at": iso(job.created_at), "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at), "updated_at": iso(job.updated_at),
        "stage": job.stage, "progress": job.progress, "warm_sources": job.warm_sources,
        "trial_counts": dict(trial_counts),
    }


def trial_dict(trial: Trial) -> dict[str, Any]:
    artifact = trial.artifact
    return {
        "job_id": trial.job_id, "trial_id": trial.trial_id, "status": trial.status,
        "config": trial.config, "attempts": trial.attempts,
        "error": trial.error, "traceback": trial.traceback,
        "started_at": iso(trial.started_at), "finished_at": iso(trial.finished_at),
        "result": trial.result,
        **{column: getattr(trial, column) for column in RESULT_COLUMNS},
        "on_front": bool(trial.on_front),
        "remeasured_latency_ms_b1": trial.remeasured_latency_ms_b1,
        "parent": trial.parent, "artifact_deleted": bool(trial.artifact_deleted),
        "artifact_uri": artifact.uri if artifact else None,
        "artifact_bytes": artifact.bytes if artifact else None,
        "artifact_sha256": artifact.sha256 if artifact else None,
    }


def deployment_dict(deployment: Deployment) -> dict[str, Any]:
    artifact = deployment.trial.artifact
    return {
        "id": deployment.id, "job_id": deployment.job_id, "trial_id": deployment.trial.trial_id,
        "endpoint": deployment.endpoint, "status": deployment.status, "who": deployment.who,
        "created_at": iso(deployment.created_at), "ended_at": iso(deployment.ended_at),
        "artifact_uri": artifact.uri if artifact else None,
    }
