"""The ONNX Runtime backend of the endpoint: an exported model (``slimray export``) in an InferenceSession.

``load(export_dir)`` returns a :class:`deploy.classifier.Classifier` whose model is an ONNX Runtime session,
so tokenisation, truncation, labels, pair checks and the answer format are the torch backend's own code,
and only the forward pass differs. ``RUNTIMES`` names what a deployment can run on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from common.errors import DeployError

__all__ = ["OrtModel", "load", "exported_dir", "RUNTIMES"]

RUNTIMES = ("torch", "onnxruntime")


class _Output(NamedTuple):
    logits: object  # a torch tensor, as a transformers model returns


class OrtModel:
    """Called like a transformers classifier (``model(input_ids=..., ...).logits``), run by ONNX Runtime."""

    def __init__(self, path: str | Path, config, *, threads: int = 1):
        from workers.onnx_runtime import session

        self.path, self.config, self.threads = str(path), config, threads
        self.session = session(path, threads=threads)

    @property
    def size_bytes(self) -> int:
        """Bytes on disk of what this runtime serves: the .onnx file (not the PyTorch artifact it came from)."""
        return Path(self.path).stat().st_size

    def __call__(self, **batch):
        import torch

        from workers.onnx_runtime import feed

        logits = self.session.run(["logits"], feed(self.session, batch))[0]
        return _Output(torch.from_numpy(logits))


def exported_dir(uri: str | Path) -> Path:
    """``uri`` when it is an export folder (model.onnx + export.json), else the artifact's default export
    folder beside it (``<artifact>-onnx``) when that holds an export of this very artifact."""
    from workers import artifacts
    from workers.export import MODEL, REPORT

    path = artifacts.resolve(uri)
    if (path / MODEL).is_file() and (path / REPORT).is_file():
        return path
    beside = path.with_name(f"{path.name}-onnx")
    if (beside / REPORT).is_file() and (path / "model.safetensors").is_file():
        source = json.loads((beside / REPORT).read_text()).get("source") or {}
        if source.get("sha256") == artifacts.info(path).sha256:
            return beside
        raise DeployError(f"{beside} holds an export of another model; run `slimray export` for {path} again")
    raise DeployError(f"{uri} has no ONNX export; run `slimray export JOB --trial ID` first (or serve it with "
                      "runtime torch)")


def load(uri: str | Path, *, threads: int = 1):
    """A Classifier over the ONNX export of ``uri`` (an export folder, or an artifact exported beside it)."""
    from transformers import AutoConfig, AutoTokenizer

    from deploy.classifier import Classifier
    from workers.export import MODEL, require_onnx

    require_onnx()
    path = exported_dir(uri)
    if not (path / "tokenizer").is_dir():
        raise DeployError(f"export {path} has no tokenizer/ directory; it cannot serve raw text")
    config = AutoConfig.from_pretrained(str(path / "config.json"))
    meta = json.loads((path / "slimray.json").read_text()) if (path / "slimray.json").is_file() else {}
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"))
    meta = {**meta, "serving_runtime": "onnxruntime"}
    return Classifier(OrtModel(path / MODEL, config, threads=threads), tokenizer, meta, str(path))
