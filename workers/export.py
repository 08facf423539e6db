"""Export a slimray artifact to ONNX, check it against the PyTorch artifact, and write it only if it agrees.

    export(artifact_uri, out_dir, rows=dev)            → ExportReport; out_dir holds model.onnx, config.json,
                                                         tokenizer/, slimray.json and export.json

The student is exported as stored: pruned head counts and FFN widths, low-rank factors and a pruned vocabulary
are just smaller tensors in the graph. Low-bit layers keep their stored int8 / int4 values and scales
(:mod:`workers.onnx_graph`); int8 word embeddings stay an int8 table gathered then scaled, int4 ones stay
packed two per byte. Batch and sequence length are dynamic axes.

Verification runs the loaded PyTorch artifact and an ONNX Runtime session on the same rows (the trial's dev
split from the CLI) and refuses, writing nothing, when the argmax agreement is under ``min_agreement``. The
files are written to a temporary sibling of ``out_dir`` and moved into place only after that check.

Without the ``onnx`` extra installed everything here fails with one line saying how to install it; importing
this module needs neither onnx nor onnxruntime.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.errors import ConfigError, SlimrayError

__all__ = ["export", "ExportReport", "ExportError", "require_onnx", "PTQ", "MIN_AGREEMENT", "REPORT", "MODEL"]

MIN_AGREEMENT = 0.995
OPSET = 17  # per-axis DequantizeLinear needs 13; LayerNormalization is one node from 17
REPORT, MODEL = "export.json", "model.onnx"
# ONNX-side post-training quantization, for artifacts stored in fp32 (the teacher, a float student)
PTQ = ("ort-dynamic-int8",)
_RANDOM_ROWS = 64


class ExportError(SlimrayError):
    """An export request that cannot be met, or an exported model that does not match its artifact."""


@dataclass(frozen=True)
class ExportReport:
    out_dir: str
    source: dict  # uri, sha256 of model.safetensors, trial
    onnx: dict  # file, bytes, sha256, opset, exporter
    quantization: dict  # per-layer forms, embeddings, what was carried and what re-derived
    verification: dict  # rows, where from, max_abs_logit_diff, argmax_agreement, min_agreement
    fusion: dict = field(default_factory=dict)  # ONNX Runtime's transformer fusions in the file, and heads per layer
    notes: list = field(default_factory=list)
    versions: dict = field(default_factory=dict)
    exported_at: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def require_onnx():
    """(onnx, onnxruntime), or a one-line error naming the extra that provides them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as err:
        raise ExportError(f"ONNX export and the onnxruntime backend need onnx and onnxruntime ({err.name} is "
                          "missing): pip install 'slimray[onnx]'") from None
    return onnx, onnxruntime


def export(artifact_uri: str | os.PathLike, out_dir: str | os.PathLike, *, rows=None, ptq: str | None = None,
           min_agreement: float = MIN_AGREEMENT, source: dict | None = None) -> ExportReport:
    """Export the artifact at ``artifact_uri`` to ``out_dir`` (created; refused when it holds another model).

    ``rows``: a :class:`workers.data.Encoded` to verify on (without it, 64 random-token rows, and the report
    says so). ``ptq``: one of :data:`PTQ`, only for an artifact stored in fp32. ``source``: extra provenance
    (job, trial) for the report."""
    from workers import artifacts

    if not 0 < min_agreement <= 1:
        raise ConfigError(f"min_agreement: must be in (0, 1], got {min_agreement!r}")
    if ptq is not None and ptq not in PTQ:
        raise ExportError(f"ptq: unknown ONNX post-training quantization {ptq!r}; use one of {', '.join(PTQ)}")
    onnx, ort = require_onnx()
    src = artifacts.resolve(artifact_uri)
    info = artifacts.info(src) if (src / "model.safetensors").is_file() else None
    if info is None:
        raise ExportError(f"{src} is not a slimray artifact (no model.safetensors); give an artifact directory")
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(out, info.sha256, ptq)

    reference, tokenizer, meta = artifacts.load(src)
    exportable, _, _ = artifacts.load(src, attn_implementation="eager", with_tokenizer=False)
    layers, embedding = _export_view(exportable)
    if ptq is not None and (layers or embedding["bits"] != 32):
        raise ExportError(f"ptq {ptq}: the artifact {src} is already quantized ({_stored_summary(layers, embedding)}"
                          "); export it without --ptq to keep its own quantization")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        names = _torch_export(exportable, tmp / MODEL)
        model = onnx.load(str(tmp / MODEL))
        records = _carry(model, layers)
        onnx.save(model, str(tmp / MODEL))
        fusion = _fuse(tmp / MODEL)
        notes = _notes(layers, embedding, ptq, fusion)
        if ptq is not None:
            _ort_dynamic_int8(tmp / MODEL)
        onnx.checker.check_model(str(tmp / MODEL))
        verification = _verify(reference, tmp / MODEL, rows, min_agreement, tokenizer, ptq)
        shutil.copy2(src / "config.json", tmp / "config.json")  # labels and shapes, for serving
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / "slimray.json").write_text(json.dumps(meta, indent=2, default=str))
        data = (tmp / MODEL).read_bytes()
        report = ExportReport(
            out_dir=str(out),
            source={"uri": str(src), "sha256": info.sha256, "size_bytes": info.size_bytes, **(source or {})},
            onnx={"file": MODEL, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "opset": OPSET,
                  "inputs": names, "exporter": "torch.onnx (TorchScript)"},
            quantization={"ptq": ptq, "layers": records, "embeddings": embedding,
                          "summary": _stored_summary(layers, embedding)}, fusion=fusion,
            verification=verification, notes=notes,
            versions={"torch": _version("torch"), "onnx": onnx.__version__, "onnxruntime": ort.__version__},
            exported_at=datetime.now(timezone.utc).isoformat())
        (tmp / REPORT).write_text(json.dumps(report.to_json(), indent=2, default=str))
        if out.exists():
            shutil.rmtree(out)  # the same model exported before (checked above): replaced whole
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


# --------------------------------------------------------------------------- pieces

def _check_out_dir(out: Path, sha256: str, ptq: str | None) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"--out {out} is a file; give a directory")
    if not any(out.iterdir()):
        return
    report = out / REPORT
    if not report.is_file():
        raise ExportError(f"--out {out} already holds other files; give an empty or new directory")
    old = json.loads(report.read_text())
    if (old.get("source") or {}).get("sha256") != sha256 or (old.get("quantization") or {}).get("ptq") != ptq:
        raise ExportError(f"--out {out} already holds a different model (from {old.get('source', {}).get('uri')}); "
                          "give another directory or delete it")


def _version(module: str) -> str:
    from importlib.metadata import version

    return version(module)


def _export_view(model):
    """Make ``model`` exportable in place: each QLinear becomes a Linear holding its dequantized weight (the
    graph rewriting then puts the stored form back), an int4 QEmbedding a module ONNX can trace. Returns the
    low-bit layers and what the word embeddings are stored as."""
    from workers.modules import BUILDERS, QEmbedding, QLinear, compressed_modules, replace_module
    from workers.onnx_graph import LowBitLinear

    layers = []
    embedding = {"bits": 32, "onnx": "Gather (fp32)"}
    for name, mod in list(compressed_modules(model)):
        if type(mod) not in BUILDERS.values():
            raise ExportError(f"layer {name}: {type(mod).__name__} has no ONNX form; export supports "
                              f"{', '.join(sorted(BUILDERS))}")
        if isinstance(mod, QLinear):
            if mod.bits == 4 and mod.act == "static":
                raise ExportError(f"layer {name}: int4 weights with static int8 activations have no ONNX form "
                                  "here; quantize with quant.mode int4 (activations fp32 or int8) or static int8")
            w = mod.dequantized_weight().detach().float()
            fields = ({"qweight": mod.qweight.numpy(), "scale": mod.scale.float().numpy()} if mod.bits == 8 else
                      {"packed": mod.packed.numpy(), "scales": mod.scales.numpy(), "group_size": mod.group_size})
            if mod.act == "static":
                fields |= {"input_scale": float(mod.input_scale), "input_zero_point": int(mod.input_zero_point)}
            layers.append(LowBitLinear(name=name, weight=w.numpy().copy(), bits=mod.bits, act=mod.act, **fields))
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(w)
                if mod.bias is not None:
                    lin.bias.copy_(mod.bias)
            replace_module(model, name, lin)
        elif isinstance(mod, QEmbedding):
            embedding = {"bits": mod.bits, "group_size": mod.group_size,
                         "onnx": "Gather of the int8 table, then row scale" if mod.bits == 8 else
                         "Gather of the packed int4 table, unpacked, then group scales"}
            if mod.bits == 4:
                replace_module(model, name, _Int4Embedding(mod))
    return layers, embedding


class _Int4Embedding(nn.Module):
    """Packed int4 rows gathered, unpacked with integer arithmetic every ONNX runtime has, then scaled per
    group: the same numbers as QEmbedding.forward, in ops the TorchScript exporter can write."""

    def __init__(self, emb):
        super().__init__()
        rows, dim, gs = emb.num_embeddings, emb.embedding_dim, emb.group_size
        self.dim, self.group_size, self.groups = dim, gs, -(-dim // gs)
        packed = torch.full((rows, self.groups * gs // 2), 0x88, dtype=torch.uint8)  # padding: stored zeros
        packed[:, :emb.packed.shape[1]] = emb.packed
        self.register_buffer("packed", packed)
        self.register_buffer("scales", emb.scales.clone())

    def forward(self, ids):
        p = self.packed[ids].to(torch.int32)
        hi = torch.div(p, 16, rounding_mode="floor")
        q = torch.stack([p - hi * 16, hi], dim=-1) - 8  # low nibble first, stored as value + 8
        q = q.reshape(ids.shape[0], ids.shape[1], self.groups, self.group_size).float()
        w = q * self.scales[ids].float().unsqueeze(-1)
        return w.reshape(ids.shape[0], ids.shape[1], self.groups * self.group_size)[..., :self.dim]


def _inputs(model) -> list[str]:
    params = inspect.signature(model.forward).parameters
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in params]


def _torch_export(model, path: Path) -> list[str]:
    import warnings

    names = _inputs(model)

    class Logits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            return self.inner(**dict(zip(names, args))).logits

    ids = torch.randint(5, min(100, model.config.vocab_size), (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter: one pass, seconds on a CPU, and the graph ORT's BERT tooling knows
        warnings.simplefilter("ignore")
        torch.onnx.export(Logits(model.eval()), tuple(example[n] for n in names), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names}
                          | {"logits": {0: "batch"}}, opset_version=OPSET, dynamo=False)
    return names


def _carry(model, layers) -> list[dict]:
    from workers.onnx_graph import carry

    return carry(model, layers) if layers else []


def _fuse(path: Path) -> dict:
    """ONNX Runtime's transformer fusions written into the file: attention, LayerNorm with its residual add,
    GELU with its bias, the embeddings' sum and LayerNorm (whatever matches: a layer already in low-bit form
    keeps its own ops). Each layer's head count is pinned first (workers.onnx_graph.pin_heads), so a layer
    whose heads were pruned fuses with its own count. The fused attention takes the raw 0/1 mask, so any
    padding side works."""
    import logging

    import onnx
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    from workers.onnx_graph import pin_heads

    model = onnx.load(str(path))
    pin_heads(model)
    options = FusionOptions("bert")
    options.use_raw_attention_mask(True)
    tool = "onnxruntime.transformers.optimizer (bert, Python fusions)"
    logging.disable(logging.WARNING)  # its modules log to their own top-level loggers: "failed to fuse" is normal
    try:
        fused = optimize_model(model, model_type="bert", num_heads=0, hidden_size=0, optimization_options=options,
                               opt_level=0, use_gpu=False)  # opt_level 0: its Python fusions only, no session
    except Exception as err:  # an optimization, not a requirement: a graph its pattern code trips on stays unfused
        return {"tool": tool, "fused": {}, "attention_heads": [],
                "skipped": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
    finally:
        logging.disable(logging.NOTSET)
    fused.save_model_to_file(str(path))
    heads = [next(a.i for a in n.attribute if a.name == "num_heads") for n in fused.model.graph.node
             if n.op_type == "Attention"]
    return {"tool": tool, "fused": {k: v for k, v in fused.get_fused_operator_statistics().items() if v},
            "attention_heads": heads}


def _ort_dynamic_int8(path: Path) -> None:
    import logging

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logging.getLogger("onnxruntime").setLevel(logging.WARNING)
    fp32 = path.with_suffix(".fp32.onnx")
    os.replace(path, fp32)
    # Attention: the fused layers' packed QKV weights, which become QAttention. ONNX shape inference cannot type
    # the outputs of the fused (com.microsoft) ops; they are all fp32.
    quantize_dynamic(str(fp32), str(path), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Attention"],
                     extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    fp32.unlink()


def _stored_summary(layers, embedding) -> str:
    if not layers and embedding["bits"] == 32:
        return "fp32"
    kinds: dict[str, int] = {}
    for layer in layers:
        key = f"int{layer.bits} ({layer.act} activations)" if layer.bits == 8 else \
            f"int4/g{layer.group_size} ({'int8' if layer.act == 'dynamic' else 'fp32'} activations)"
        kinds[key] = kinds.get(key, 0) + 1
    parts = [f"{n} Linears {k}" for k, n in kinds.items()]
    if embedding["bits"] != 32:
        parts.append(f"int{embedding['bits']} word embeddings")
    return ", ".join(parts)


def _notes(layers, embedding, ptq, fusion) -> list[str]:
    fused = ", ".join(f"{n} {op}" for op, n in fusion["fused"].items()) or \
        (f"none: the fusion failed ({fusion['skipped']})" if fusion.get("skipped") else "nothing matched")
    notes = ["LayerNorms, biases, position/token-type embeddings, pooler and classifier are fp32, as in the "
             "artifact",
             f"ONNX Runtime's transformer fusions are in the file ({fused}): com.microsoft ops, so the file runs on "
             "ONNX Runtime; the session adds its own graph optimizations (ORT_ENABLE_ALL) when it loads"]
    if len(set(fusion["attention_heads"])) > 1:
        notes.append(f"attention fused per layer with its own head count ({fusion['attention_heads']}): heads were "
                     "pruned unevenly")
    acts = {(layer.bits, layer.act) for layer in layers}
    if (8, "dynamic") in acts:
        notes.append("dynamic int8: weights and per-row scales carried; activations quantized per call onto "
                     "[0, 127] as PyTorch's fbgemm kernel does (reduce_range), written as ReduceMin/Max + "
                     "QuantizeLinear, so ONNX Runtime does not fuse it into DynamicQuantizeMatMul; 7-bit "
                     "activations also keep ONNX Runtime's u8s8 kernels clear of int16 saturation on CPUs "
                     "without VNNI")
    if (8, "static") in acts:
        notes.append("static int8 (PTQ or QAT): weights, per-row scales and the calibrated input scale and zero "
                     "point carried as QDQ; no re-calibration")
    if (4, "none") in acts:
        notes.append("int4: packed nibbles and group scales carried into MatMulNBits (fp16 scales widened to "
                     "fp32, exactly); activations fp32")
    if (4, "dynamic") in acts:
        notes.append("int4 with int8 activations: MatMulNBits accuracy_level 4 quantizes activations per block "
                     "against the int4 weights, where PyTorch re-quantizes the weights to int8 rows; the logits "
                     "differ slightly")
    if embedding["bits"] != 32:
        notes.append(f"word embeddings stay int{embedding['bits']} in the file ({embedding['onnx']})")
    if ptq is not None:
        notes.append(f"{ptq}: ONNX Runtime's quantize_dynamic derived per-channel int8 weight scales from the fp32 "
                     "weights (the artifact stores no scales)")
    return notes


def _random_rows(tokenizer, vocab: int):
    from workers.data import Encoded

    rng = np.random.default_rng(0)
    lengths = rng.integers(4, 33, size=_RANDOM_ROWS)
    ids = np.zeros((_RANDOM_ROWS, int(lengths.max())), dtype=np.int64)
    low = min(5, vocab - 1)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(low, vocab, size=n)
    return Encoded(ids, np.zeros_like(ids), lengths, np.zeros(_RANDOM_ROWS, dtype=np.int64))


def _verify(reference, path: Path, rows, min_agreement: float, tokenizer, ptq: str | None) -> dict:
    from workers.evaluate import predict_logits
    from workers.onnx_runtime import session, run_logits

    where = "given rows"
    if rows is None:
        rows, where = _random_rows(tokenizer, reference.config.vocab_size), "random token rows (no rows given)"
    if not len(rows):
        raise ExportError("verification rows are empty; give at least one row")
    torch_logits = predict_logits(reference, rows)
    sess = session(path, threads=os.cpu_count() or 1)
    onnx_logits = run_logits(sess, rows)
    agree = float((torch_logits.argmax(-1) == onnx_logits.argmax(-1)).mean())
    diff = float(np.abs(torch_logits - onnx_logits).max())
    result = {"rows": int(len(rows)), "on": where, "max_abs_logit_diff": diff, "argmax_agreement": agree,
              "min_agreement": min_agreement}
    if where == "given rows":  # real labels: the accuracy each runtime gets on them
        result["accuracy"] = {"torch": float((torch_logits.argmax(-1) == rows.labels).mean()),
                              "onnx": float((onnx_logits.argmax(-1) == rows.labels).mean())}
    if not agree >= min_agreement:
        hint = (f"; {ptq} re-quantizes the fp32 model, which changes some predictions by design: lower "
                "--min-agreement to accept it") if ptq else ""
        raise ExportError(f"export refused: the ONNX model agrees with the PyTorch artifact on {agree:.2%} of "
                          f"{len(rows)} rows (needs {min_agreement:.1%}; max logit difference {diff:.3g}){hint}; "
                          "nothing written")
    return result
