import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import BertForSequenceClassification

from conftest import tiny_bert_config
from workers import artifacts
from common.trial_config import (DynamicInt8, FfnPrune, HeadPrune, Int4WeightOnly, LowRankConfig, MixedPrecision,
                             QatInt8, StaticInt8, StructuredPrune, UnstructuredPrune)
from workers.data import Encoded
from workers.evaluate import nonzero_params
from workers.lowrank import factorize
from workers.modules import (FakeQuantLinear, QEmbedding, QLinear, dequantize_groups_int4, quantize_groups_int4,
                             quantize_rows_int8)
from workers.prune import prune
from workers.quantize import assign_bits, mse_range, percentile_range, prepare_qat, quantize

QUANT = [DynamicInt8(), DynamicInt8(embedding_bits=4), DynamicInt8(embeddings=False),
         StaticInt8(calibration_samples=32), StaticInt8(calibration_samples=32, observer="histogram"),
         StaticInt8(calibration_samples=32, observer="percentile"), QatInt8(), Int4WeightOnly(group_size=32),
         Int4WeightOnly(activations="int8"), MixedPrecision(calibration_samples=16, group_size=16)]
# max |logit error| / max |logit| on the random tiny model: int8 rounds to 1/254 of each row's range, int4 to 1/14
TOLERANCE = {8: 0.05, 4: 0.25}


def _data(n=64, seq=12, vocab=1000):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (n, seq)).astype(np.int32)
    return Encoded(ids, np.zeros_like(ids, dtype=np.int8), np.full(n, seq), (ids[:, 1] % 2).astype(np.int64))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _bits(cfg):
    return 4 if isinstance(cfg, Int4WeightOnly) or getattr(cfg, "embedding_bits", 8) == 4 else 8


def _qat_trained(model, data, steps=2):
    """A couple of plain optimizer steps in fake-quant mode (the DeepSpeed loop is tested with pruning)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model.train()
    for i in range(steps):
        b = data.batch(range(i * 16, (i + 1) * 16))
        loss = torch.nn.functional.cross_entropy(model(**{k: v for k, v in b.items() if k != "labels"}).logits,
                                                 b["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


@pytest.mark.parametrize("cfg", QUANT, ids=lambda c: f"{type(c).__name__}-{'-'.join(map(str, vars(c).values()))}")
def test_quantized_artifact_stores_low_bits_and_reloads_exactly(tiny_bert, random_batch, tmp_path, cfg):
    data = _data()
    ref = _logits(tiny_bert, random_batch)
    if isinstance(cfg, QatInt8):
        _qat_trained(prepare_qat(tiny_bert, cfg), data)
        ref = _logits(tiny_bert, random_batch)
    dense_count = nonzero_params(tiny_bert)
    quantize(tiny_bert, cfg, calibration=data)
    out = _logits(tiny_bert, random_batch)
    assert (out - ref).abs().max() <= TOLERANCE[_bits(cfg)] * ref.abs().max()
    info = artifacts.save(tiny_bert, None, tmp_path / "q")
    loaded, _, _ = artifacts.load(info.uri)
    assert torch.equal(_logits(loaded, random_batch), out)
    with safe_open(str(tmp_path / "q" / "model.safetensors"), framework="pt") as fh:
        dtypes = {k: fh.get_slice(k).get_dtype() for k in fh.keys()}
    enc = {k: v for k, v in dtypes.items() if ".encoder." in k and "LayerNorm" not in k
           and k.endswith(("weight", "qweight", "packed"))}
    assert enc and all(v in ("I8", "U8") for v in enc.values())  # no fp32 Linear weight left in the encoder
    assert ("bert.embeddings.word_embeddings.weight" not in dtypes) == cfg.embeddings
    # kept in fp32 on purpose: LayerNorms, biases, position/token-type embeddings, pooler and classifier
    for k in ("bert.embeddings.position_embeddings.weight", "bert.embeddings.LayerNorm.weight",
              "bert.pooler.dense.weight", "classifier.weight", "bert.encoder.layer.0.output.LayerNorm.weight"):
        assert dtypes[k] == "F32"
    # stored values counted once each (int4 rounds the smallest of these N(0, 0.02) weights to zero)
    assert 0.5 * dense_count < nonzero_params(loaded) <= dense_count


def test_qat_converts_to_int8_matching_fake_quant(tiny_bert, random_batch, tmp_path):
    """Tolerance: |converted − fake-quant| ≤ 1e-4 + 1e-4·|logit|. Both use the same int8 weights and the same
    activation grid; they differ only by fp32 vs int32 summation order (and a rounding tie now and then)."""
    data = _data()
    prepare_qat(tiny_bert, QatInt8(observer_momentum=0.5))
    fq = [m for m in tiny_bert.modules() if isinstance(m, FakeQuantLinear)]
    assert len(fq) == 12
    w0 = fq[0].weight.detach().clone()
    _qat_trained(tiny_bert, data)
    assert not torch.equal(fq[0].weight, w0)  # gradients flow through the rounding (straight-through)
    assert all(bool(m.observed) and m.act_range[0] <= m.act_range[1] for m in fq)
    fake = _logits(tiny_bert, random_batch)
    quantize(tiny_bert, QatInt8(), calibration=None)  # trained: no calibration needed
    real = _logits(tiny_bert, random_batch)
    assert torch.allclose(real, fake, atol=1e-4, rtol=1e-4)
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_bert.modules())
    assert isinstance(tiny_bert.bert.embeddings.word_embeddings, QEmbedding)
    info = artifacts.save(tiny_bert, None, tmp_path / "qat")
    assert torch.equal(_logits(artifacts.load(info.uri)[0], random_batch), real)


def test_int8_dynamic_stays_close_on_real_rows(tiny_bert):
    data = _data(64)
    b = {k: v for k, v in data.batch(range(64)).items() if k != "labels"}
    ref = _logits(tiny_bert, b)
    out = _logits(quantize(tiny_bert, DynamicInt8()), b)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


def test_bits_shrink_the_artifact(tmp_path):
    """On a model whose Linear + word-embedding weights are 97% of its parameters: int8 stores 1 byte instead of 4
    (+ a scale per row), int4 half a byte (+ an fp16 scale per 64 values); the fp32 rest (position embeddings,
    pooler, LayerNorms, biases) and config.json keep the ratios above 1/4 and 1/8."""
    torch.manual_seed(0)
    cfg = tiny_bert_config(hidden=128, ffn=1024, heads=4, layers=2)
    cfg.max_position_embeddings = 32
    model = BertForSequenceClassification(cfg).eval()
    fp32 = artifacts.save(model, None, tmp_path / "fp32").size_bytes
    sizes = {}
    for name, qcfg in (("int8", DynamicInt8()), ("int4", Int4WeightOnly()), ("mixed", MixedPrecision(bit_budget=6))):
        m = BertForSequenceClassification(cfg).eval()
        m.load_state_dict(model.state_dict())
        quantize(m, qcfg)  # no calibration: the mixed-precision sensitivity falls back to weight error
        sizes[name] = artifacts.save(m, None, tmp_path / name).size_bytes / fp32
    assert sizes["int8"] <= 0.3 and sizes["int4"] <= 0.17 and sizes["int4"] < sizes["mixed"] < sizes["int8"]


def test_nonzero_params_counts_stored_values(tiny_bert):
    n = nonzero_params(tiny_bert)
    prune(tiny_bert, UnstructuredPrune(sparsity=0.5, schedule="oneshot"))
    sparse = nonzero_params(tiny_bert)
    assert sparse < n
    quantize(tiny_bert, DynamicInt8())
    lin = tiny_bert.bert.encoder.layer[0].intermediate.dense
    assert isinstance(lin, QLinear) and lin.nonzero() == int((lin.qweight != 0).sum()) + int((lin.bias != 0).sum())
    assert abs(nonzero_params(tiny_bert) - sparse) < 0.01 * n  # zeros stay zeros in int8 (tiny ones round to 0)


def test_low_bit_formats():
    torch.manual_seed(0)
    w = torch.randn(5, 37)
    q, s = quantize_rows_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127 and ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2
                                                                  + 1e-6).all()
    packed, scales = quantize_groups_int4(w, 16)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 19) and scales.shape == (5, 3)
    assert scales.dtype == torch.float16
    d = dequantize_groups_int4(packed, scales, 37, 16)
    assert ((d - w).abs() <= scales.float().repeat_interleave(16, 1)[:, :37] / 2 + 1e-6).all()
    assert (packed[:, -1] >> 4 == 8).all()  # the odd column's padding nibble is a stored zero
    zero = quantize_groups_int4(torch.zeros(2, 16), 16)[0]
    assert (zero == 0x88).all()


def test_assign_bits_under_budget():
    sens, sizes = [0.5, 0.1, 0.9, 0.2], [100, 100, 100, 300]
    bits = assign_bits(sens, sizes, (4, 8), 6.0)
    avg = sum(b * s for b, s in zip(bits, sizes)) / sum(sizes)
    assert bits == [8, 8, 8, 4] and avg <= 6.0  # the big layer does not fit, the three sensitive ones do
    assert assign_bits(sens, sizes, (4, 8), 4.0) == [4] * 4
    assert assign_bits(sens, sizes, (4, 8), 8.0) == [8] * 4


def test_calibration_ranges_clip_outliers():
    hist = np.zeros(2048)
    hist[:1024] = 1000  # values in [0, 1): dense
    hist[-1] = 1  # one outlier near 100
    lo, hi = percentile_range(hist, 0.0, 100.0)
    assert hi < 60 and lo == 0.0
    lo, hi = mse_range(hist, 0.0, 100.0)
    assert hi < 100.0


@pytest.mark.parametrize("make", [
    lambda m: prune(m, HeadPrune(heads=(2, 3), importance="magnitude")),
    lambda m: prune(m, FfnPrune(sparsity=0.3, importance="magnitude")),
    lambda m: prune(m, StructuredPrune(sparsity=0.5, importance="magnitude")),
    lambda m: prune(m, UnstructuredPrune(sparsity=0.6, schedule="oneshot", scope="layer")),
    lambda m: factorize(m, LowRankConfig(ratio=0.3)),
    lambda m: quantize(factorize(prune(m, StructuredPrune(importance="magnitude")), LowRankConfig(ratio=0.3)),
                       DynamicInt8(embedding_bits=4)),
    lambda m: quantize(prune(m, HeadPrune(sparsity=0.4, importance="magnitude")), Int4WeightOnly(group_size=16)),
    lambda m: quantize(factorize(m, LowRankConfig(ratio=0.3)), StaticInt8(calibration_samples=16), calibration=_data()),
], ids=["heads", "ffn", "structured", "unstructured", "lowrank", "structured+lowrank+int8/emb4", "heads+int4",
        "lowrank+static"])
def test_every_compression_reloads_exactly(tiny_bert, random_batch, tmp_path, make):
    make(tiny_bert)
    tiny_bert.eval()
    info = artifacts.save(tiny_bert, None, tmp_path / "a")
    assert torch.equal(_logits(artifacts.load(info.uri)[0], random_batch), _logits(tiny_bert, random_batch))
