"""ONNX export: every quant mode of a tiny student exported and checked against PyTorch, the refusal path,
the missing extra, and one-line answers to bad requests."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from conftest import _tokenizer, promotion_store, tiny_artifact, tiny_bert_config, write_tiny_sentiment  # noqa: E402
from common.trial_config import (DynamicInt8, Int4WeightOnly, LowRankConfig, MixedPrecision, QatInt8,  # noqa: E402
                             StaticInt8)
from workers.export import ExportError, export  # noqa: E402

# (config, the op the encoder Linears must become, max |logit difference| allowed)
MODES = {
    "fp32": (None, "Attention", 1e-4),  # ONNX Runtime's attention fusion, in the file
    "dynamic": (DynamicInt8(), "MatMulInteger", 0.05),
    "dynamic-fp32-embeddings": (DynamicInt8(embeddings=False), "MatMulInteger", 0.05),
    "static": (StaticInt8(calibration_samples=64), "QuantizeLinear", 1e-4),
    "qat": (QatInt8(), "QuantizeLinear", 1e-4),
    "int4": (Int4WeightOnly(group_size=16), "MatMulNBits", 1e-4),
    "int4-int8-activations": (Int4WeightOnly(group_size=32, activations="int8"), "MatMulNBits", 0.05),
    "mixed": (MixedPrecision(bits=(4, 8), bit_budget=6, group_size=16), "MatMulNBits", 0.05),
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return _tokenizer(tmp_path_factory.mktemp("vocab"))


@pytest.fixture(scope="module")
def rows(tmp_path_factory, tok):
    """150 made-up sentences of 7-14 tokens, as an Encoded split (varied lengths: the dynamic axes are used)."""
    from workers import data

    d = write_tiny_sentiment(tmp_path_factory.mktemp("task"), train=10, eval=150)
    split = data.load(data.TaskConfig(dataset=str(d))).eval
    return data.encode(split, tok, 32)


def _student(tok, out: Path, quant=None, *, rows=None, shrink: bool = False, seed: int = 0):
    """A tiny BERT artifact, optionally with uneven heads/FFN per layer and low-rank FFNs, then quantized."""
    import torch
    from transformers import BertForSequenceClassification

    from workers import artifacts
    from workers.lowrank import factorize
    from workers.quantize import quantize
    from workers.shapes import keep_ffn, keep_heads, layers_of

    torch.manual_seed(seed)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    if shrink:
        layers = layers_of(model)
        keep_heads(layers[0], [0, 2, 3])
        keep_heads(layers[1], [1])
        keep_ffn(layers[1], list(range(0, 128, 2)))
        factorize(model, LowRankConfig(ratio=0.25))
    if quant is not None:
        model = quantize(model, quant, calibration=rows)
    artifacts.save(model, tok, out)
    return out


def _graph(out: Path):
    import onnx

    return onnx.load(str(out / "model.onnx"))


@pytest.mark.parametrize("mode", list(MODES))
def test_every_quant_mode_exports_and_agrees(mode, tmp_path, tok, rows):
    import onnxruntime as ort

    quant, op, tolerance = MODES[mode]
    art = _student(tok, tmp_path / "art", quant, rows=rows, shrink=mode in ("dynamic", "int4"))
    report = export(art, tmp_path / "onnx", rows=rows)

    v = report.verification
    assert v["rows"] == len(rows) and v["on"] == "given rows"
    assert v["argmax_agreement"] == 1.0 and v["max_abs_logit_diff"] < tolerance, v
    out = tmp_path / "onnx"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "export.json", "model.onnx", "slimray.json",
                                                     "tokenizer"]
    assert json.loads((out / "export.json").read_text())["verification"] == v
    graph = _graph(out).graph
    ops = {n.op_type for n in graph.node}
    assert op in ops
    float_matrices = [t.name for t in graph.initializer if t.data_type == 1 and len(t.dims) == 2
                      and not any(k in t.name for k in ("embeddings", "pooler", "classifier"))]
    # fp32: the 12 encoder weights, Q, K and V packed into one per layer by the attention fusion (8); quantized:
    # none left in fp32 beside the low-bit form
    assert (len(float_matrices) >= 8) if quant is None else (float_matrices == []), float_matrices
    # dynamic batch and sequence axes: a shape the export never saw runs
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(5, 1000, size=(3, 41))
    logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids),
                             "token_type_ids": np.zeros_like(ids)})[0]
    assert logits.shape == (3, 2) and np.isfinite(logits).all()


def test_stored_low_bit_values_are_carried_not_recomputed(tmp_path, tok, rows):
    from onnx import numpy_helper
    from safetensors.numpy import load_file

    art = _student(tok, tmp_path / "art", Int4WeightOnly(group_size=16), rows=rows)
    stored = load_file(str(art / "model.safetensors"))
    int8 = _student(tok, tmp_path / "art8", DynamicInt8(), rows=rows)
    stored8 = load_file(str(int8 / "model.safetensors"))
    export(art, tmp_path / "o4", rows=rows)
    export(int8, tmp_path / "o8", rows=rows)
    inits4 = {t.name: numpy_helper.to_array(t) for t in _graph(tmp_path / "o4").graph.initializer}
    inits8 = {t.name: numpy_helper.to_array(t) for t in _graph(tmp_path / "o8").graph.initializer}

    name = "bert.encoder.layer.0.attention.self.query"
    packed = inits4[f"{name}.packed"]
    assert packed.dtype == np.uint8 and packed.shape == (64, 4, 8)  # [out, blocks, 16 values / 2]
    np.testing.assert_array_equal(packed.reshape(64, -1), stored[f"{name}.packed"])
    np.testing.assert_array_equal(inits4[f"{name}.scales"], stored[f"{name}.scales"].astype(np.float32).ravel())
    np.testing.assert_array_equal(inits8[f"{name}.qweight"], stored8[f"{name}.qweight"].T)
    np.testing.assert_array_equal(inits8[f"{name}.scale"], stored8[f"{name}.scale"])
    # the word embeddings stay low-bit in the file: int4 packed, int8 rows
    assert any(a.dtype == np.uint8 and a.shape[0] == 1000 for a in inits4.values())
    assert any(a.dtype == np.int8 and a.shape == (1000, 64) for a in inits8.values())


def test_disagreeing_export_is_refused_and_nothing_is_written(tmp_path, tok, rows, monkeypatch):
    from onnx import numpy_helper

    import workers.export as export_mod

    real = export_mod._carry

    def corrupt(model, layers):  # an exporter bug stand-in: the classifier's weights flipped in the graph
        records = real(model, layers)
        for t in model.graph.initializer:
            if t.name.endswith("classifier.weight"):
                t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), name=t.name))
        return records

    monkeypatch.setattr(export_mod, "_carry", corrupt)
    art = _student(tok, tmp_path / "art", DynamicInt8(), rows=rows)
    with pytest.raises(ExportError) as err:
        export(art, tmp_path / "out" / "onnx", rows=rows)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("export refused") and "nothing written" in msg
    assert list((tmp_path / "out").iterdir()) == []  # no model, no half-written temp folder


def test_without_rows_it_checks_random_rows_and_says_so(tmp_path):
    tiny_artifact(tmp_path / "art")
    report = export(tmp_path / "art", tmp_path / "onnx")
    assert report.verification["on"].startswith("random") and report.verification["argmax_agreement"] == 1.0


def test_ort_dynamic_ptq_of_an_fp32_artifact(tmp_path, tok, rows):
    art = _student(tok, tmp_path / "art")
    report = export(art, tmp_path / "onnx", rows=rows, ptq="ort-dynamic-int8")
    ops = {n.op_type for n in _graph(tmp_path / "onnx").graph.node}
    assert "MatMulInteger" in ops and "QAttention" in ops  # the fused attention's QKV weights quantized too
    assert report.verification["argmax_agreement"] >= 0.995
    assert set(report.verification["accuracy"]) == {"torch", "onnx"}  # the given rows carry labels
    assert any("derived" in n for n in report.notes)  # the report says the scales are ONNX Runtime's


def test_uneven_heads_fuse_per_layer_and_keep_the_torch_logits(tmp_path, tok, rows):
    """Heads pruned differently per layer (3, 1 and 4 of 4): ONNX Runtime's attention fusion gets each layer's
    own head count and the fused file gives the PyTorch logits; fused with one model-wide count (what the fusion
    does when told the config's heads) the same layers give other logits. Q and K are scaled up so attention is
    sharp (at the random init it is nearly uniform, and a wrong head split would hardly show), the classifier so
    the logits are of order one."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import BertForSequenceClassification

    from workers import artifacts
    from workers.evaluate import predict_logits
    from workers.export import _torch_export
    from workers.onnx_runtime import run_logits, session
    from workers.shapes import keep_heads, layers_of

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(layers=3)).eval()
    with torch.no_grad():
        for layer in layers_of(model):
            layer.attention.self.query.weight.mul_(30)
            layer.attention.self.key.weight.mul_(30)
        model.classifier.weight.mul_(50)
    keep_heads(layers_of(model)[0], [0, 2, 3])
    keep_heads(layers_of(model)[1], [1])
    artifacts.save(model, tok, tmp_path / "art")
    report = export(tmp_path / "art", tmp_path / "onnx", rows=rows)

    assert report.fusion["attention_heads"] == [3, 1, 4]
    assert report.fusion["fused"]["Attention"] == 3 and report.fusion["fused"].get("SkipLayerNormalization")
    with torch.no_grad():
        want = predict_logits(model, rows)  # rows of 7-14 tokens: batches carry padding, the mask matters
    scale = float(np.abs(want).max())
    assert scale > 0.5
    got = run_logits(session(tmp_path / "onnx" / "model.onnx"), rows)
    assert float(np.abs(got - want).max()) < 1e-4 * scale

    eager, _, _ = artifacts.load(tmp_path / "art", attn_implementation="eager", with_tokenizer=False)  # as export
    _torch_export(eager, tmp_path / "plain.onnx")
    wrong = optimize_model(str(tmp_path / "plain.onnx"), model_type="bert", num_heads=4, hidden_size=64,
                           opt_level=0)
    assert {n.op_type for n in wrong.model.graph.node} >= {"Attention"}
    wrong.save_model_to_file(str(tmp_path / "wrong.onnx"))
    off = run_logits(session(tmp_path / "wrong.onnx"), rows)
    assert float(np.abs(off - want).max()) > 1e-2 * scale


def test_a_fusion_failure_leaves_the_export_unfused_and_says_so(tmp_path, tok, rows, monkeypatch):
    import onnxruntime.transformers.optimizer as optimizer

    def broken(*args, **kwargs):
        raise AssertionError("a pattern it did not expect")

    monkeypatch.setattr(optimizer, "optimize_model", broken)
    report = export(_student(tok, tmp_path / "art"), tmp_path / "onnx", rows=rows)
    assert report.fusion["fused"] == {} and "a pattern it did not expect" in report.fusion["skipped"]
    assert any("the fusion failed" in n for n in report.notes)
    ops = {n.op_type for n in _graph(tmp_path / "onnx").graph.node}
    assert "Attention" not in ops and "MatMul" in ops
    assert report.verification["argmax_agreement"] == 1.0


def test_bad_requests_get_one_line_errors(tmp_path, tok, rows):
    import torch
    from transformers import BertForSequenceClassification

    from workers import artifacts
    from workers.modules import QLinear

    quantized = _student(tok, tmp_path / "q", DynamicInt8(), rows=rows)
    with pytest.raises(ExportError, match="already quantized"):
        export(quantized, tmp_path / "o1", ptq="ort-dynamic-int8")
    with pytest.raises(ExportError, match="unknown ONNX post-training"):
        export(quantized, tmp_path / "o1", ptq="int3")
    with pytest.raises(ExportError, match="not a slimray artifact"):
        export(tmp_path / "nowhere", tmp_path / "o1")

    # int4 weights with static int8 activations: QLinear can hold it, ONNX export says it cannot
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config()).eval()
    q = model.bert.encoder.layer[0].intermediate.dense
    model.bert.encoder.layer[0].intermediate.dense = QLinear.from_linear(q, bits=4, group_size=16, act="static",
                                                                         input_range=(-1.0, 1.0))
    artifacts.save(model, tok, tmp_path / "odd")
    with pytest.raises(ExportError, match="int4 weights with static int8 activations"):
        export(tmp_path / "odd", tmp_path / "o2")

    # the output folder: the same model is replaced, a different one or foreign files are refused
    a = tiny_artifact(tmp_path / "a", seed=0).uri
    b = tiny_artifact(tmp_path / "b", seed=1).uri
    export(a, tmp_path / "out")
    export(a, tmp_path / "out")
    with pytest.raises(ExportError, match="already holds a different model") as err:
        export(b, tmp_path / "out")
    assert "\n" not in str(err.value)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already holds other files"):
        export(a, tmp_path / "busy")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    for out in ("o1", "o2"):
        assert not (tmp_path / out).exists()


def test_missing_extra_is_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    tiny_artifact(tmp_path / "art")
    with pytest.raises(ExportError) as err:
        export(tmp_path / "art", tmp_path / "onnx")
    assert "pip install 'slimray[onnx]'" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "onnx").exists()


def test_slimray_imports_without_onnx():
    code = ("import sys; sys.modules['onnx'] = None; sys.modules['onnxruntime'] = None\n"
            "import orchestrator.cli, orchestrator.exporting, workers.export, workers.onnx_graph, "
            "workers.onnx_runtime\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr


def test_cli_exports_a_trial_checked_on_the_dev_split(tmp_path, tiny_task_dir, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    art = tiny_artifact(tmp_path / "jobs" / "j1" / "t1").uri
    store = promotion_store(f"sqlite:///{tmp_path}/s.db", "j1",
                            [{"trial_id": "t1", "metric": 80.0, "artifact_uri": art},
                             {"trial_id": "t2", "metric": 70.0, "status": "error"}],
                            spec={"task": {"dataset": str(tiny_task_dir), "eval_size": 60, "max_length": 32}})
    monkeypatch.setenv("SLIMRAY_DB_URL", store.url)
    monkeypatch.setenv("SLIMRAY_HOME", str(tmp_path))
    runner = CliRunner()

    res = runner.invoke(app, ["export", "j1", "--trial", "t1", "--format", "onnx"])
    assert res.exit_code == 0, res.output
    out = Path(art).with_name("t1-onnx")
    report = json.loads((out / "export.json").read_text())
    assert report["verification"]["rows"] == 60 and report["verification"]["on"] == "given rows"
    assert report["source"]["job"] == "j1" and report["source"]["trial"] == "t1"
    assert "agrees on 100.00% of 60 dev rows" in " ".join(res.output.split())

    for args, words in ((["export", "nojob", "--trial", "t1"], "no job 'nojob'"),
                        (["export", "j1", "--trial", "t9"], "has no trial 't9'"),
                        (["export", "j1", "--trial", "t2"], "has no artifact"),
                        (["export", "j1", "--trial", "t1", "--format", "tflite"], "unknown format"),
                        (["export", "j1", "--trial", "t1", "--out", str(tmp_path / "jobs")], "other files")):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        line = " ".join(res.output.split())
        assert words in line and line.startswith("error:"), (args, res.output)
