"""The trial recipe end to end: teacher → student → compress → distill (DeepSpeed) → artifact → measure."""
import numpy as np
import pytest
import torch

from workers import artifacts
from common.trial_config import TrainConfig, TrialConfig
from workers.data import TaskConfig, load
from workers.evaluate import predict_logits
from workers.teacher import prepare
from workers.trial import TrialContext, run


def _context(t, tmp_path, name, **kw):
    return TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                        teacher_logits=t.train_logits, metric="accuracy", out_dir=str(tmp_path / name), seq_len=16,
                        latency_runs=3, **kw)


@pytest.fixture(scope="module")
def tiny_prepared(tiny_teacher_dir, tiny_task_dir, tmp_path_factory):
    data = load(TaskConfig(dataset=str(tiny_task_dir), train_size=128, eval_size=64, max_length=32))
    return prepare(str(tiny_teacher_dir), data, TrainConfig(lr=1e-3, epochs=1, batch_size=16),
                   tmp_path_factory.mktemp("teachers"))


def test_teacher_is_prepared_once_and_cached(tiny_prepared, tiny_teacher_dir, tiny_task_dir):
    t = tiny_prepared
    assert t.train_logits.shape == (128, 2) and t.metrics["size_bytes"] > 0
    again = prepare(str(tiny_teacher_dir),
                    load(TaskConfig(dataset=str(tiny_task_dir), train_size=128, eval_size=64, max_length=32)),
                    TrainConfig(lr=1e-3, epochs=1, batch_size=16), t.uri.rsplit("/", 1)[0])
    assert again.uri == t.uri and np.array_equal(again.train_logits, t.train_logits)


def test_recipe_composes_and_artifact_reloads(tiny_prepared, tmp_path):
    cfg = TrialConfig.model_validate({"student": {"layers": 1}, "prune": {"kind": "heads", "sparsity": 0.5,
                                                                      "importance": "magnitude"},
                                 "quant": {"mode": "dynamic"}, "train": {"max_steps": 4, "batch_size": 16}})
    reports = []
    result = run(cfg, _context(tiny_prepared, tmp_path, "t1", report=lambda m, c: reports.append(m)))
    for key in ("metric", "metric_drop", "size_bytes", "params", "latency_ms_b1", "latency_ms_b32", "artifact_uri"):
        assert key in result
    assert result["size_bytes"] < tiny_prepared.metrics["size_bytes"] / 3  # 1 of 2 layers, half the heads, int8
    model, _, meta = artifacts.load(result["artifact_uri"])
    assert meta["trial_config"] == cfg.model_dump(mode="json", exclude_none=True)
    assert meta["metrics"]["size_bytes"] == result["size_bytes"]
    assert model.bert.encoder.layer[0].attention.self.num_attention_heads == 2
    again, _, _ = artifacts.load(result["artifact_uri"])
    assert np.array_equal(predict_logits(model, tiny_prepared.eval), predict_logits(again, tiny_prepared.eval))


def test_intermediate_reports_carry_checkpoints(tiny_prepared, tmp_path):
    cfg = TrialConfig.model_validate({"train": {"max_steps": 4, "batch_size": 16, "eval_every": 2}})
    seen = []
    run(cfg, _context(tiny_prepared, tmp_path, "t2", report=lambda m, c: seen.append((m["step"], c)),
                      checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2))
    assert [s for s, _ in seen] == [2] and seen[0][1] == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latest").exists()


@pytest.mark.slow
@pytest.mark.glue
def test_real_minilm_recipe_on_sst2(tmp_path):
    """The real all-MiniLM-L6-v2 teacher, a few hundred SST-2 rows, a handful of DeepSpeed steps."""
    data = load(TaskConfig(dataset="glue/sst2", train_size=400, eval_size=200, max_length=48))
    t = prepare("minilm", data, TrainConfig(lr=1e-4, epochs=3, batch_size=16), tmp_path / "teachers")
    assert t.metrics["params"] > 22_000_000 and t.metrics["accuracy"] > 60  # chance is ~51%
    cfg = TrialConfig.model_validate({"student": {"layers": 3}, "distill": {"temperature": 2.0, "alpha": 0.9},
                                 "train": {"lr": 1e-4, "max_steps": 10, "batch_size": 16}})
    result = run(cfg, TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                                   teacher_logits=t.train_logits, metric="accuracy", out_dir=str(tmp_path / "s"),
                                   seq_len=48, latency_runs=5))
    assert result["accuracy"] > 55 and result["train_steps"] == 10
    assert result["size_bytes"] < 0.85 * t.metrics["size_bytes"]
    model, tok, _ = artifacts.load(result["artifact_uri"])
    enc = tok(["a gorgeous, witty film", "a dull mess"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = model(**enc).logits
        b = artifacts.load(result["artifact_uri"])[0](**enc).logits
    assert torch.equal(a, b)
