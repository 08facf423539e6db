"""What a prepared teacher is keyed on, and the lock that lets only one job prepare it.

The key is a hash of everything that decides the fine-tuned weights: the base model's files (their bytes), the
rows it trains and is measured on, its settings, and the source of the code that trains it. Hashing a model's
files is the only slow part, so each file's hash is remembered next to the cache by (path, size, mtime).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["files_hash", "rows_hash", "source_hash", "key", "locked"]

# What a model directory's identity lives in: weights, configs, vocabularies. Not READMEs or exported copies.
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".txt", ".model")
_MEMO = "file-hashes.json"


def _file_sha(path: Path, memo: dict) -> str:
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    got = memo.get(str(path))
    if got and got[:2] == stamp:
        return got[2]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    memo[str(path)] = [*stamp, h.hexdigest()]
    return h.hexdigest()


def files_hash(model_dir: str | os.PathLike, memo_dir: str | os.PathLike) -> str:
    """One hash of a model directory's weight, config and vocabulary files (names and bytes)."""
    root = Path(model_dir).resolve()
    memo_file = Path(memo_dir) / _MEMO
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    before = dict(memo)
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and p.suffix in _MODEL_SUFFIXES and not any(part.startswith(".") for part in rel.parts):
            h.update(f"{rel.as_posix()}\0{_file_sha(p.resolve(), memo)}\n".encode())
    if memo != before:  # another process may write it too: the last whole file wins, each one is complete
        Path(memo_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo_dir, prefix=_MEMO, suffix=".tmp", delete=False) as fh:
            fh.write(json.dumps(memo))
        os.replace(fh.name, memo_file)
    return h.hexdigest()


def rows_hash(texts: list, labels: np.ndarray) -> str:
    """A hash of a split's rows: their texts (or text pairs) and class indices, in order."""
    h = hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def source_hash(*modules: str) -> str:
    """A hash of the named modules' source files, so that changing the code that trains a teacher retires it."""
    import importlib.util

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        h.update(name.encode() + b"\0" + Path(spec.origin).read_bytes())
    return h.hexdigest()


def key(**parts) -> str:
    """A short hash of JSON-able ``parts``."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(lock_file: str | os.PathLike, on_wait=None):
    """Hold an exclusive lock on ``lock_file``; a second holder (thread or process) waits for the first.
    ``on_wait()`` is called once when the lock is busy, before waiting."""
    Path(lock_file).parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
