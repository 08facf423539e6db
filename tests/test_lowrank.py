import math

import pytest
import torch
from torch import nn

from workers import artifacts
from common.trial_config import LowRankConfig
from common.errors import ConfigError
from workers.lowrank import break_even_rank, choose_rank, factorize, svd_factors
from workers.modules import LowRankLinear


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_factorize_replaces_only_the_ffn_linears(tiny_bert, random_batch, tmp_path):
    dense = artifacts.save(tiny_bert, None, tmp_path / "dense")
    ref = _logits(tiny_bert, random_batch)
    factorize(tiny_bert, LowRankConfig(ratio=0.25))
    for layer in tiny_bert.bert.encoder.layer:
        for lin in (layer.intermediate.dense, layer.output.dense):
            assert isinstance(lin, LowRankLinear) and lin.rank == math.ceil(0.25 * 64)
        assert type(layer.attention.output.dense) is nn.Linear  # "output.dense" is the FFN's, not attention's
    up = tiny_bert.bert.encoder.layer[0].intermediate.dense
    assert up.first.weight.shape == (16, 64) and up.second.weight.shape == (128, 16)
    out = _logits(tiny_bert, random_batch)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    info = artifacts.save(tiny_bert, None, tmp_path / "lr")
    assert info.size_bytes < dense.size_bytes
    assert torch.equal(_logits(artifacts.load(info.uri)[0], random_batch), out)


def test_full_rank_factors_reproduce_the_matrix():
    torch.manual_seed(0)
    w = torch.randn(12, 7)
    first, second, s = svd_factors(w)
    assert torch.allclose(second @ first, w, atol=1e-5) and len(s) == 7


def test_rank_choice():
    s = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 -> cumulative share 0.64, 0.93, 1
    assert choose_rank(s, LowRankConfig(energy=0.5)) == 1
    assert choose_rank(s, LowRankConfig(energy=0.9)) == 2
    assert choose_rank(s, LowRankConfig(energy=0.95)) == 3
    assert choose_rank(torch.ones(64), LowRankConfig(ratio=0.1)) == 7  # ceil
    assert break_even_rank(384, 1536) == pytest.approx(307.2) and break_even_rank(64, 64) == 32


def test_ranks_that_save_nothing_are_skipped(tiny_bert):
    factorize(tiny_bert, LowRankConfig(ratio=1.0))  # rank = min(in, out): never smaller; no error, no change
    factorize(tiny_bert, LowRankConfig(energy=0.9999))  # random weights need almost full rank
    assert not any(isinstance(m, LowRankLinear) for m in tiny_bert.modules())
    # 64x64 attention output: break-even rank 32; ratio 0.5 gives 32 -> skipped, 0.45 gives 29 -> factorized
    factorize(tiny_bert, LowRankConfig(ratio=0.5, targets=("attention.output.dense",)))
    assert not any(isinstance(m, LowRankLinear) for m in tiny_bert.modules())
    factorize(tiny_bert, LowRankConfig(ratio=0.45, targets=("query",)))
    assert isinstance(tiny_bert.bert.encoder.layer[1].attention.self.query, LowRankLinear)


def test_unknown_targets_are_a_config_error(tiny_bert):
    with pytest.raises(ConfigError, match="lowrank.targets"):
        factorize(tiny_bert, LowRankConfig(targets=("intermediate.dens",)))
