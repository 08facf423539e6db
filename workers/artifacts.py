"""An artifact is a directory a model can be rebuilt from without its teacher and without unpickling:

    model.safetensors  weights as stored: pruned shapes already removed, quantized tensors in low-bit form,
                       mostly-zero fp32 matrices as a bitmask plus their non-zero values
    config.json        the transformers config plus the real per-layer shapes (``slimray_layers``) and the
                       compressed modules (``slimray_structure``)
    tokenizer/         the tokenizer files
    slimray.json       trial config, metrics and provenance, and ``vocab_sha256``: the tokenizer's tokens in id
                       order, which the word-embedding rows follow (a pruned vocabulary has its own)

``size_bytes`` is what the weights and config take on disk (the tokenizer is the same for every trial and
is counted separately in ``artifact_bytes``).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import SlimrayError

__all__ = ["ArtifactInfo", "save", "size_bytes", "load", "info", "read_meta", "update_meta", "resolve",
           "check_tokenizer", "SPARSE_THRESHOLD"]

# Below this share of zeros a bitmask + values is not smaller than the dense fp32 tensor.
SPARSE_THRESHOLD = 1 / 32 + 0.01
_WEIGHTS, _CONFIG, _META, _TOKENIZER = "model.safetensors", "config.json", "slimray.json", "tokenizer"


@dataclass(frozen=True)
class ArtifactInfo:
    uri: str
    size_bytes: int  # model.safetensors + config.json
    artifact_bytes: int  # everything in the directory
    sha256: str  # of model.safetensors


def resolve(uri: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """The artifact directory for ``uri``; with ``root`` set, paths escaping it (``../``) are refused."""
    path = Path(str(uri).removeprefix("file://")).expanduser()
    if root is not None:
        base = Path(root).expanduser().resolve()
        full = (base / path).resolve() if not path.is_absolute() else path.resolve()
        if full != base and base not in full.parents:
            raise SlimrayError(f"artifact path {uri} is outside the artifact root {base}; refusing to load it")
        path = full
    return path


def _encode(state: dict) -> tuple[dict, dict]:
    import torch

    tensors, encoding = {}, {}
    for name, t in state.items():
        t = t.detach().contiguous().cpu()
        if t.dtype == torch.float32 and t.dim() == 2 and name.endswith("weight"):
            nz = t != 0
            if 1 - nz.float().mean().item() >= SPARSE_THRESHOLD:
                bits = np.packbits(nz.numpy().reshape(-1))
                tensors[name + ".__mask"] = torch.from_numpy(bits)
                tensors[name + ".__values"] = t[nz].clone()
                encoding[name] = {"codec": "bitmask", "shape": list(t.shape)}
                continue
        tensors[name] = t.clone()  # clone: safetensors refuses tensors that share storage
    return tensors, encoding


def _decode(tensors: dict, encoding: dict) -> dict:
    import torch

    state = {k: v for k, v in tensors.items() if ".__" not in k}
    for name, enc in encoding.items():
        if enc["codec"] != "bitmask":
            raise SlimrayError(f"artifact tensor {name} uses unknown codec {enc['codec']!r}")
        shape = enc["shape"]
        n = int(np.prod(shape))
        mask = np.unpackbits(tensors[name + ".__mask"].numpy())[:n].astype(bool)
        dense = torch.zeros(n, dtype=torch.float32)
        dense[torch.from_numpy(mask)] = tensors[name + ".__values"]
        state[name] = dense.reshape(shape)
    return state


def _stored(model) -> tuple[dict, dict]:
    """(tensors, safetensors metadata) of ``model`` as ``save`` stores them; records its shapes in its config."""
    from workers.modules import compressed_modules
    from workers.shapes import record_shapes

    record_shapes(model)
    model.config.slimray_structure = {name: m.structure() for name, m in compressed_modules(model)}
    tensors, encoding = _encode(model.state_dict())
    return tensors, {"slimray_encoding": json.dumps(encoding), "format": "pt"}


def size_bytes(model) -> int:
    """The ``size_bytes`` that ``save`` would report for ``model``, computed in memory (nothing is written)."""
    from safetensors.torch import save as serialise

    tensors, metadata = _stored(model)
    return len(serialise(tensors, metadata=metadata)) + len(model.config.to_json_string().encode("utf-8"))


def save(model, tokenizer, out_dir: str | os.PathLike, meta: dict | None = None) -> ArtifactInfo:
    """Write ``model`` (+ tokenizer and ``meta``) as an artifact directory; returns its sizes."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, metadata = _stored(model)
    save_file(tensors, str(out / _WEIGHTS), metadata=metadata)
    model.config.to_json_file(str(out / _CONFIG))
    meta = dict(meta or {})
    if tokenizer is not None:
        from workers.vocab import vocab_hash

        tokenizer.save_pretrained(str(out / _TOKENIZER))
        meta["vocab_sha256"] = vocab_hash(tokenizer)
    (out / _META).write_text(json.dumps({"format": 1, **meta}, indent=2, default=str))
    return info(out)


def info(out_dir: str | os.PathLike) -> ArtifactInfo:
    out = Path(out_dir)
    weights = out / _WEIGHTS
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ArtifactInfo(uri=str(out.resolve()), size_bytes=weights.stat().st_size + (out / _CONFIG).stat().st_size,
                        artifact_bytes=total, sha256=hashlib.sha256(weights.read_bytes()).hexdigest())


def read_meta(uri: str | os.PathLike) -> dict:
    return json.loads((Path(uri) / _META).read_text())


def update_meta(uri: str | os.PathLike, **fields) -> None:
    meta = read_meta(uri)
    meta.update(fields)
    (Path(uri) / _META).write_text(json.dumps(meta, indent=2, default=str))


def load(uri: str | os.PathLike, *, root: str | os.PathLike | None = None, attn_implementation: str = "sdpa",
         with_tokenizer: bool = True):
    """Rebuild ``(model, tokenizer, meta)`` from an artifact: safetensors and JSON only, never pickle."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from workers.modules import BUILDERS, replace_module
    from workers.shapes import apply_shapes

    path = resolve(uri, root)
    for required in (_WEIGHTS, _CONFIG):
        if not (path / required).is_file():
            raise SlimrayError(f"{path} is not a slimray artifact: {required} is missing")
    config = AutoConfig.from_pretrained(str(path / _CONFIG))
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation)
    apply_shapes(model, getattr(config, "slimray_layers", None) or [])
    for name, s in (getattr(config, "slimray_structure", None) or {}).items():
        if s.get("type") not in BUILDERS:
            raise SlimrayError(f"{path}: module {name} has unknown type {s.get('type')!r}; upgrade slimray")
        replace_module(model, name, BUILDERS[s["type"]].from_structure(s))
    with safe_open(str(path / _WEIGHTS), framework="pt") as fh:
        encoding = json.loads((fh.metadata() or {}).get("slimray_encoding", "{}"))
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    missing, unexpected = model.load_state_dict(_decode(tensors, encoding), strict=False)
    if unexpected or [k for k in missing if not k.endswith("position_ids")]:
        raise SlimrayError(f"{path}: weights do not match the recorded shapes "
                           f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for _, m in _loaded_hooks(model):
        m.after_load()
    model.eval()
    tokenizer = None
    meta = json.loads((path / _META).read_text()) if (path / _META).is_file() else {}
    if with_tokenizer and (path / _TOKENIZER).is_dir():
        tokenizer = AutoTokenizer.from_pretrained(str(path / _TOKENIZER))
        check_tokenizer(meta, tokenizer, path)
    return model, tokenizer, meta


def check_tokenizer(meta: dict, tokenizer, where) -> None:
    """Refuse ``tokenizer`` for a model whose artifact recorded another vocabulary: its ids would pick the wrong
    embedding rows (artifacts written before the hash was recorded are taken as they are)."""
    from workers.vocab import vocab_hash

    recorded = meta.get("vocab_sha256")
    if recorded and tokenizer is not None and vocab_hash(tokenizer) != recorded:
        raise SlimrayError(f"{where}: the tokenizer's vocabulary ({len(tokenizer.get_vocab())} tokens) is not the "
                           f"one the model was saved with; use the artifact's own tokenizer/ directory")


def _loaded_hooks(model):
    # Quantized modules pack their weights for the fast kernels once the stored tensors are in place.
    for name, m in model.named_modules():
        if hasattr(m, "after_load"):
            yield name, m
