import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.configs import (DynamicInt8, FfnPrune, HeadPrune, Int4WeightOnly, LowRankConfig, MixedPrecision,
                             QatInt8, StaticInt8, StructuredPrune, TrialConfig, UnstructuredPrune, from_dict,
                             to_dict)
from common.errors import ConfigError

EVERY_COMPRESSION = [
    UnstructuredPrune(sparsity=0.8, scope="layer", initial_sparsity=0.1, schedule="cubic", end_fraction=0.5),
    UnstructuredPrune(sparsity=0.5, schedule="oneshot"),
    HeadPrune(sparsity=0.3, importance="magnitude", samples=64),
    HeadPrune(heads=(3, 1, 2)),
    FfnPrune(sparsity=0.4),
    StructuredPrune(sparsity=0.5, importance="magnitude"),
    DynamicInt8(), DynamicInt8(embeddings=False), DynamicInt8(embedding_bits=4),
    StaticInt8(calibration_samples=16, observer="histogram", embedding_bits=4),
    QatInt8(observer_momentum=0.1), Int4WeightOnly(group_size=32, activations="int8"),
    MixedPrecision(bit_budget=5.0, group_size=128, bits=(8, 4), calibration_samples=8),
    LowRankConfig(), LowRankConfig(energy=0.9, targets=("intermediate.dense",)),
]


@pytest.mark.parametrize("cfg", EVERY_COMPRESSION, ids=lambda c: type(c).__name__)
def test_every_compression_config_round_trips_through_json(cfg):
    section = "lowrank" if isinstance(cfg, LowRankConfig) else (
        "prune" if type(cfg).__name__.endswith("Prune") else "quant")
    trial = TrialConfig(**{section: cfg})
    d = json.loads(json.dumps(trial.to_dict()))
    assert TrialConfig.from_dict(d) == trial
    if section != "lowrank":
        assert d[section]["kind" if section == "prune" else "mode"]  # tagged unions carry their tag
    assert from_dict(type(cfg), {k: v for k, v in to_dict(cfg).items() if k not in ("kind", "mode")}) == cfg


def test_tagged_unions_and_off_switches():
    t = TrialConfig.from_dict({"prune": {"kind": "heads", "heads": [2, 2]}, "quant": {"mode": "mixed", "bits": [4, 8]},
                               "lowrank": {"ratio": 0}})
    assert t.prune == HeadPrune(heads=(2, 2)) and t.quant == MixedPrecision() and t.lowrank is None
    assert TrialConfig.from_dict({"quant": {"mode": "none"}}).quant is None
    assert TrialConfig.from_dict({"lowrank": {"energy": 0.95}}).lowrank == LowRankConfig(energy=0.95)
    with pytest.raises(ConfigError, match="quant: unknown key"):
        TrialConfig.from_dict({"quant": {"mode": "int4", "bits": 4}})
    with pytest.raises(ConfigError, match="quant.mode"):
        TrialConfig.from_dict({"quant": {"mode": "int3"}})


@pytest.mark.parametrize("make, field", [
    (lambda: UnstructuredPrune(sparsity=1.0), "prune.sparsity"),
    (lambda: UnstructuredPrune(sparsity=0.5, initial_sparsity=0.6), "prune.initial_sparsity"),
    (lambda: HeadPrune(sparsity=1.2), "prune.sparsity"),
    (lambda: HeadPrune(heads=(2, 0)), r"prune.heads\[1\]"),
    (lambda: FfnPrune(samples=0), "prune.samples"),
    (lambda: MixedPrecision(bits=(3, 8)), r"quant.bits\[0\]"),
    (lambda: MixedPrecision(bit_budget=9), "quant.bit_budget"),
    (lambda: MixedPrecision(bits=(8,), bit_budget=6), "quant.bit_budget"),
    (lambda: DynamicInt8(embedding_bits=3), "quant.embedding_bits"),
    (lambda: Int4WeightOnly(group_size=7), "quant.group_size"),
    (lambda: Int4WeightOnly(activations="int4"), "quant.activations"),
    (lambda: StaticInt8(observer="entropy"), "quant.observer"),
    (lambda: QatInt8(observer_momentum=0), "quant.observer_momentum"),
    (lambda: LowRankConfig(ratio=1.5), "lowrank.ratio"),
    (lambda: LowRankConfig(ratio=0.0), "lowrank.ratio"),
    (lambda: LowRankConfig(ratio=0.5, energy=0.9), "lowrank"),
    (lambda: LowRankConfig(targets=()), "lowrank.targets"),
])
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


@settings(max_examples=40, deadline=None)
@given(final=st.floats(0, 0.99), initial=st.floats(0, 0.99), end=st.floats(0.01, 1.0),
       scope=st.sampled_from(["global", "layer"]), budget=st.floats(4, 8), group=st.sampled_from([16, 64, 256]))
def test_round_trip_property(final, initial, end, scope, budget, group):
    c = TrialConfig(prune=UnstructuredPrune(sparsity=final, initial_sparsity=min(initial, final), end_fraction=end,
                                            scope=scope), quant=MixedPrecision(bit_budget=budget, group_size=group))
    assert TrialConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
