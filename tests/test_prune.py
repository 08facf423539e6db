import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from workers import artifacts
from common.trial_config import (DistillConfig, FfnPrune, HeadPrune, LowRankConfig, StructuredPrune, TrainConfig,
                             UnstructuredPrune)
from workers.data import Encoded
from workers.distill import distill
from common.errors import ConfigError
from workers.lowrank import factorize
from workers.modules import LowRankLinear
from workers.prune import (cubic_sparsity, encoder_linears, gradient_importance, prune, schedule, select_heads,
                           sparsity_of, target_sparsity)
from workers.shapes import layer_shapes


def _data(n=64, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (n, seq)).astype(np.int32)
    return Encoded(ids, np.zeros_like(ids, dtype=np.int8), np.full(n, seq), (ids[:, 1] % 2).astype(np.int64))


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- structured

def test_head_pruning_removes_heads_from_the_shapes_unevenly(tiny_bert, random_batch, tmp_path):
    data = _data()
    teacher_logits = np.random.default_rng(1).normal(size=(len(data), 2)).astype(np.float32)
    dense = artifacts.save(tiny_bert, None, tmp_path / "dense")
    # make layer 1's heads 0-2 useless (zero output columns) so the global ranking must take 3 heads there
    o = tiny_bert.bert.encoder.layer[1].attention.output.dense.weight
    o.data[:, :48] = 0
    prune(tiny_bert, HeadPrune(sparsity=3 / 8, samples=32), data=data, teacher_logits=teacher_logits)
    assert [s["heads"] for s in layer_shapes(tiny_bert)] == [4, 1]
    att = tiny_bert.bert.encoder.layer[1].attention
    assert att.self.query.weight.shape == (16, 64) and att.output.dense.weight.shape == (64, 16)
    info = artifacts.save(tiny_bert, None, tmp_path / "pruned")
    assert info.size_bytes < dense.size_bytes
    loaded, _, _ = artifacts.load(info.uri)
    assert torch.equal(_logits(loaded, random_batch), _logits(tiny_bert, random_batch))


@pytest.mark.parametrize("importance", ["gradient", "magnitude"])
def test_useless_units_go_first_and_outputs_do_not_change(tiny_bert, random_batch, importance):
    before = _logits(tiny_bert, random_batch)
    for layer in tiny_bert.bert.encoder.layer:
        layer.attention.output.dense.weight.data[:, 16:32] = 0  # head 1 contributes nothing
        layer.output.dense.weight.data[:, :13] = 0  # neurons 0-12 contribute nothing
    ref = _logits(tiny_bert, random_batch)
    prune(tiny_bert, HeadPrune(sparsity=0.25, importance=importance, samples=32), data=_data())
    prune(tiny_bert, FfnPrune(sparsity=0.1, importance=importance, samples=32), data=_data())
    assert layer_shapes(tiny_bert) == [{"heads": 3, "head_dim": 16, "ffn": 115}] * 2
    out = _logits(tiny_bert, random_batch)
    assert torch.allclose(out, ref, atol=1e-5)  # exactly the dead units were removed
    assert not torch.allclose(before, ref)


def test_structured_prunes_heads_and_ffn_and_composes_with_layer_dropping(tiny_bert_4l, tmp_path, random_batch):
    from common.trial_config import StudentConfig
    from workers.student import build

    s = build(tiny_bert_4l, StudentConfig(layers=2))
    prune(s, StructuredPrune(sparsity=0.5, samples=32), data=_data())
    assert sum(x["heads"] for x in layer_shapes(s)) == 4 and [x["ffn"] for x in layer_shapes(s)] == [64, 64]
    info = artifacts.save(s, None, tmp_path / "a")
    s.eval()
    assert torch.equal(_logits(artifacts.load(info.uri)[0], random_batch), _logits(s, random_batch))


def test_explicit_head_counts_are_honoured_and_checked(tiny_bert):
    prune(tiny_bert, HeadPrune(heads=(1, 3), importance="magnitude"))
    assert [s["heads"] for s in layer_shapes(tiny_bert)] == [1, 3]
    with pytest.raises(ConfigError, match=r"prune.heads\[1\]"):
        prune(tiny_bert, HeadPrune(heads=(1, 4), importance="magnitude"))  # layer 1 has 3 heads left
    with pytest.raises(ConfigError, match="prune.heads"):
        prune(tiny_bert, HeadPrune(heads=(1,), importance="magnitude"))
    with pytest.raises(ConfigError, match="prune.importance"):
        prune(tiny_bert, FfnPrune(importance="gradient"))  # gradient importance without data


def test_select_heads_is_global_and_keeps_one_per_layer():
    scores = [torch.tensor([0.01, 0.02, 0.03, 0.04]), torch.tensor([1.0, 2.0, 3.0, 4.0])]
    # per-layer normalisation makes the layers comparable: the first head of each layer ranks lowest
    keep = select_heads(scores, 0.25, None)
    assert keep == [[1, 2, 3], [1, 2, 3]]
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([0.1, 10.0, 10.0, 10.1])]
    assert select_heads(scores, 0.5, None) == [[3], [1, 2, 3]]  # uneven: 3 heads go from layer 0, 1 from layer 1
    assert select_heads(scores, 0.99, None) == [[3], [3]]  # never the last head of a layer
    assert select_heads([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([1.0, 5.0])], 0.0, [2, 1]) == [[0, 2], [1]]


def test_gradient_importance_uses_teacher_logits_or_labels(tiny_bert):
    data = _data(32)
    h_ce, f_ce = gradient_importance(tiny_bert, data, None, samples=32)
    h_kd, _ = gradient_importance(tiny_bert, data, np.zeros((32, 2), np.float32), samples=32)
    assert [len(h) for h in h_ce] == [4, 4] and [len(f) for f in f_ce] == [128, 128]
    assert all((h > 0).all() for h in h_ce) and not torch.allclose(h_ce[0], h_kd[0])
    assert all(p.grad is None for p in tiny_bert.parameters())  # only the masks were differentiated


# --------------------------------------------------------------------------- unstructured

def test_cubic_schedule_values():
    assert cubic_sparsity(0, 100, 0.1, 0.9) == pytest.approx(0.1)
    assert cubic_sparsity(50, 100, 0.1, 0.9) == pytest.approx(0.9 - 0.8 / 8)
    assert cubic_sparsity(100, 100, 0.1, 0.9) == cubic_sparsity(150, 100, 0.1, 0.9) == 0.9
    vals = [cubic_sparsity(t, 10, 0.0, 0.8) for t in range(12)]
    assert vals == sorted(vals)
    cfg = UnstructuredPrune(sparsity=0.8, initial_sparsity=0.2, end_fraction=0.5)
    assert target_sparsity(cfg, 5, 10) == 0.8 and target_sparsity(cfg, 0, 10) == pytest.approx(0.2)
    assert target_sparsity(UnstructuredPrune(sparsity=0.7, schedule="oneshot"), 0, 10) == 0.7


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_oneshot_magnitude_masks_hit_the_target(tiny_bert, scope):
    prune(tiny_bert, UnstructuredPrune(sparsity=0.8, schedule="oneshot", scope=scope))
    weights = [m.weight for _, m in encoder_linears(tiny_bert)]
    n = sum(w.numel() for w in weights)
    assert abs(sparsity_of(tiny_bert) * n - round(0.8 * n)) <= (1 if scope == "global" else len(weights))
    if scope == "layer":
        assert all(abs(int((w == 0).sum()) - round(0.8 * w.numel())) <= 1 for w in weights)
    assert tiny_bert.bert.pooler.dense.weight.ne(0).all()  # the head is not pruned
    kept = torch.cat([w[w != 0].abs() for w in weights])
    assert kept.min() > 0


def test_schedule_only_for_unstructured():
    assert schedule(torch.nn.Linear(2, 2), None) is None
    assert schedule(torch.nn.Linear(2, 2), HeadPrune()) is None


def test_gradual_pruning_through_distill_ends_at_target_with_exact_zeros(tiny_bert):
    cfg = UnstructuredPrune(sparsity=0.7, initial_sparsity=0.1, end_fraction=0.5)
    factorize(tiny_bert, LowRankConfig(ratio=0.25))  # composes: the factors are pruned too
    prune(tiny_bert, cfg)
    seen, zeros = [], []

    def watch(step, total, model):
        seen.append(sparsity_of(model))
        zeros.append({n: m.weight == 0 for n, m in encoder_linears(model)})

    distill(tiny_bert, _data(), DistillConfig(alpha=0.0), TrainConfig(max_steps=6, batch_size=8, lr=1e-2),
            callbacks=[schedule(tiny_bert, cfg), watch])
    n = sum(m.weight.numel() for _, m in encoder_linears(tiny_bert))
    assert seen == sorted(seen) and seen[2] == pytest.approx(0.7, abs=1 / n)  # T = 0.5 · 6 steps
    assert seen[-1] == pytest.approx(0.7, abs=1 / n)
    assert seen[0] == pytest.approx(cubic_sparsity(1, 3, 0.1, 0.7), abs=1 / n)
    for before, after in zip(zeros, zeros[1:]):  # a pruned weight stays pruned (masks only grow)
        assert all((after[k] | ~before[k]).all() for k in before)
    factors = [m for m in tiny_bert.modules() if isinstance(m, LowRankLinear)]
    assert factors and all((f.first.weight == 0).float().mean() > 0.3 for f in factors)


def test_sparsity_shrinks_the_artifact(tmp_path, random_batch):
    # Linear weights dominate this model (small vocab): 80% sparse Linears store 1 bit + 20% of 4 bytes each
    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config(hidden=64, ffn=256, vocab=64)).eval()
    ids = {**random_batch, "input_ids": random_batch["input_ids"] % 64}
    dense = artifacts.save(model, None, tmp_path / "dense")
    prune(model, UnstructuredPrune(sparsity=0.8, schedule="oneshot"))
    sparse = artifacts.save(model, None, tmp_path / "sparse")
    assert sparse.size_bytes <= 0.45 * dense.size_bytes
    loaded, _, _ = artifacts.load(sparse.uri)
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_structured_pruning_needs_plain_linears(tiny_bert):
    factorize(tiny_bert, LowRankConfig(ratio=0.25))
    with pytest.raises(TypeError, match="prune before"):
        prune(tiny_bert, FfnPrune(importance="magnitude"))
