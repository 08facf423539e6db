"""`slimray export JOB --trial ID`: a stored trial's artifact → workers.export, verified on the job's dev split."""
from __future__ import annotations

from pathlib import Path

from workers.export import ExportError

__all__ = ["export_trial", "FORMATS", "default_out"]

FORMATS = ("onnx",)


def default_out(artifact_uri: str, fmt: str) -> Path:
    """Beside the trial's artifact: ``<artifact>-onnx``."""
    path = Path(str(artifact_uri).removeprefix("file://"))
    return path.with_name(f"{path.name}-{fmt}")


def export_trial(job_id: str, trial_id: str, *, fmt: str = "onnx", out: str | Path | None = None,
                 ptq: str | None = None, store=None):
    """Export trial ``trial_id`` of ``job_id``; returns the workers.export.ExportReport."""
    from common.paths import open_store
    from workers import data as task_data
    from workers.export import export, require_onnx

    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    require_onnx()
    store = store or open_store()
    job = store.get_job(job_id)
    trial = next((t for t in store.trials(job_id) if t["trial_id"] == trial_id), None)
    if trial is None:
        raise ExportError(f"job {job_id} has no trial {trial_id!r}; see `slimray results {job_id}`")
    uri = trial.get("artifact_uri")
    if not uri or trial.get("artifact_deleted"):
        raise ExportError(f"trial {trial_id} of job {job_id} has no artifact to export (status {trial['status']}); "
                          "pick another with --trial")
    rows = _dev_rows(job.get("spec") or {}, uri, task_data)
    return export(uri, out or default_out(uri, fmt), rows=rows, ptq=ptq,
                  source={"job": job_id, "trial": trial_id, "dataset": job.get("dataset")})


def _dev_rows(spec: dict, uri: str, task_data):
    """The job's dev split, tokenised as the trial saw it."""
    from transformers import AutoTokenizer

    from workers import artifacts

    cfg = task_data.TaskConfig.model_validate(spec.get("task") or {})
    tok_dir = artifacts.resolve(uri) / "tokenizer"
    if not tok_dir.is_dir():
        raise ExportError(f"artifact {uri} has no tokenizer/ directory; it cannot be checked on the dev split")
    data = task_data.load(cfg)
    return task_data.encode(data.eval, AutoTokenizer.from_pretrained(str(tok_dir)), cfg.max_length)
