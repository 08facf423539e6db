"""`slimray export JOB --trial ID`: a stored trial's artifact → workers.export, verified on the job's dev split;
and, for `slimray promote --runtime`, the export a runtime needs and the timing that picks one."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from common.errors import SlimrayError
from workers.export import ExportError

__all__ = ["export_trial", "FORMATS", "default_out", "RUNTIME_CHOICES", "choose_runtime", "time_runtimes",
           "prepare_runtime"]

FORMATS = ("onnx",)


def default_out(artifact_uri: str, fmt: str) -> Path:
    """Beside the trial's artifact: ``<artifact>-onnx``."""
    path = Path(str(artifact_uri).removeprefix("file://"))
    return path.with_name(f"{path.name}-{fmt}")


def export_trial(job_id: str, trial_id: str, *, fmt: str = "onnx", out: str | Path | None = None,
                 ptq: str | None = None, min_agreement: float | None = None, store=None):
    """Export trial ``trial_id`` of ``job_id``; returns the workers.export.ExportReport."""
    from common.paths import open_store
    from workers import data as task_data
    from workers.export import MIN_AGREEMENT, export, require_onnx

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
                  min_agreement=MIN_AGREEMENT if min_agreement is None else min_agreement, source={"job": job_id, "trial": trial_id, "dataset": job.get("dataset")})


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


# --------------------------------------------------------------------------- the serving runtime at promotion

RUNTIME_CHOICES = ("torch", "onnxruntime", "auto")


def choose_runtime(torch_ms: list[float], ort_ms: list[float]) -> dict:
    """ONNX Runtime only when its median is lower than torch's by more than the spread (the larger of the two
    interquartile ranges): a gap inside the noise keeps torch, the backend every trial was measured on."""
    def summary(times):
        q1, med, q3 = np.percentile(np.asarray(times, dtype=float), [25, 50, 75])
        return {"median_ms": float(med), "spread_ms": float(q3 - q1), "runs": len(times)}

    t, o = summary(torch_ms), summary(ort_ms)
    spread = max(t["spread_ms"], o["spread_ms"])
    pick = "onnxruntime" if t["median_ms"] - o["median_ms"] > spread else "torch"
    return {"runtime": pick, "torch": t, "onnxruntime": o, "spread_ms": spread}


def time_runtimes(artifact_uri: str, export_dir: str | Path, *, seq_len: int, runs: int) -> dict:
    """Batch-1 latency of the artifact under torch and of its export under ONNX Runtime, 1 thread each, runs
    interleaved so both see the same machine; returns :func:`choose_runtime`'s answer."""
    import time

    import torch

    from deploy.ort_backend import OrtModel
    from workers import artifacts
    from workers.export import MODEL

    model, _, _ = artifacts.load(artifact_uri, with_tokenizer=False)
    ort = OrtModel(Path(export_dir) / MODEL, model.config, threads=1)
    positions = getattr(model.config, "max_position_embeddings", None) or seq_len
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (1, min(seq_len, positions)), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            for i in range(runs + 5):  # the first 5 of each warm up
                for name, run in (("torch", model), ("onnxruntime", ort)):
                    t0 = time.perf_counter()
                    run(**batch)
                    if i >= 5:
                        times[name].append((time.perf_counter() - t0) * 1000)
    finally:
        torch.set_num_threads(old)
    return choose_runtime(times["torch"], times["onnxruntime"])


def prepare_runtime(job_id: str, trial: dict, runtime: str, *, seq_len: int, runs: int, store=None) -> dict:
    """Before serving ``trial`` on ``runtime`` (one of RUNTIME_CHOICES): its ONNX export exists (made and
    checked on the dev split when missing), and ``auto`` is resolved by timing both. Returns
    ``{"runtime": ..., "export": dir or None, "timing": ... (auto only)}``."""
    from deploy.ort_backend import exported_dir

    if runtime not in RUNTIME_CHOICES:
        raise ExportError(f"--runtime: unknown runtime {runtime!r}; use one of {', '.join(RUNTIME_CHOICES)}")
    if runtime == "torch":
        return {"runtime": "torch", "export": None}
    uri = trial["artifact_uri"]
    try:
        out = exported_dir(uri)
    except SlimrayError:
        out = Path(export_trial(job_id, trial["trial_id"], store=store).out_dir)
    if runtime == "onnxruntime":
        return {"runtime": "onnxruntime", "export": str(out)}
    timing = time_runtimes(uri, out, seq_len=seq_len, runs=runs)
    return {"runtime": timing["runtime"], "export": str(out) if timing["runtime"] == "onnxruntime" else None,
            "timing": timing}
