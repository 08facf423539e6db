import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.trial_config import (DistillConfig, DynamicInt8, FfnPrune, HeadPrune, Int4WeightOnly, LowRankConfig,
                             MixedPrecision, QatInt8, StaticInt8, StructuredPrune, StudentConfig, TeacherTrainConfig,
                             TrainConfig, TrialConfig, UnstructuredPrune)
from workers.data import TaskConfig
from common.errors import ConfigError


def _json(cfg):
    return json.loads(json.dumps(cfg.model_dump(mode="json")))

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
    d = _json(trial)
    assert TrialConfig.model_validate(d) == trial
    assert TrialConfig.model_validate_json(trial.model_dump_json()) == trial
    if section != "lowrank":
        assert d[section]["kind" if section == "prune" else "mode"]  # tagged unions carry their tag
    assert type(cfg).model_validate(_json(cfg)) == cfg


@pytest.mark.parametrize("cfg", [
    StudentConfig(layers=2, hidden=64, heads=4, layer_choice="top"),
    DistillConfig(temperature=4, alpha=0.5, hidden_weight=1.0),
    TrainConfig(lr=3e-4, max_steps=10, zero_stage=2, group_by_length=False),
    TeacherTrainConfig(train_size=100, seeds=(0, 1)), TaskConfig(dataset="glue/mrpc", labels=("no", "yes")),
    TrialConfig(student=StudentConfig(layers=1), prune=HeadPrune(heads=(1, 2)), quant=Int4WeightOnly(),
                lowrank=LowRankConfig(ratio=0.25), train=TrainConfig(epochs=2))], ids=lambda c: type(c).__name__)
def test_every_config_model_round_trips_through_json(cfg):
    assert type(cfg).model_validate(_json(cfg)) == cfg
    assert type(cfg).model_validate_json(cfg.model_dump_json()) == cfg
    with pytest.raises(Exception):
        cfg.seed = 3  # frozen


def test_tagged_unions_and_off_switches():
    t = TrialConfig.model_validate({"prune": {"kind": "heads", "heads": [2, 2]},
                                    "quant": {"mode": "mixed", "bits": [4, 8]}, "lowrank": {"ratio": 0}})
    assert t.prune == HeadPrune(heads=(2, 2)) and t.quant == MixedPrecision() and t.lowrank is None
    assert TrialConfig.model_validate({"quant": {"mode": "none"}}).quant is None
    assert TrialConfig.model_validate({"lowrank": {"energy": 0.95}}).lowrank == LowRankConfig(energy=0.95)
    with pytest.raises(ConfigError, match=r"quant\.bits: unknown key; allowed: activations, "):
        TrialConfig.model_validate({"quant": {"mode": "int4", "bits": 4}})
    with pytest.raises(ConfigError, match="quant.mode: must be one of none|dynamic"):
        TrialConfig.model_validate({"quant": {"mode": "int3"}})


def test_configs_stored_by_earlier_versions_load():
    old = {"student": {"layers": 2, "layer_choice": "uniform", "hidden": None, "heads": None, "ffn": None},
           "prune": {"kind": "none"}, "lowrank": {"ratio": 0, "energy": None, "targets": ["output.dense"]},
           "quant": {"mode": "dynamic", "embeddings": True, "embedding_bits": 8},
           "distill": {"temperature": 2.0, "alpha": 0.9, "hidden_weight": 0.0, "attention_weight": 0.0},
           "train": {"lr": 1e-4, "epochs": 1.0, "max_steps": None, "batch_size": 32, "grad_accum": 1,
                     "weight_decay": 0.01, "warmup_ratio": 0.06, "zero_stage": 0, "precision": "auto", "seed": 0,
                     "eval_every": 0}}
    t = TrialConfig.model_validate(old)
    assert t.prune is None and t.lowrank is None and t.quant == DynamicInt8() and t.student.layers == 2


def test_every_problem_at_once_with_its_path():
    with pytest.raises(ConfigError) as info:
        TrialConfig.model_validate({"student": {"hidden": 10, "heads": 3}, "prune": {"kind": "heads", "sparsity": 1.2,
                                    "heads": [2, 0], "colour": 1}, "train": {"lr": 5, "batch_size": "big",
                                                                             "zero_stage": True}, "extra": {}})
    lines = info.value.problems
    for needle in ("student.hidden: must be divisible by student.heads (3), got 10", "prune.sparsity: must be < 1",
                   "prune.heads[1]: must be ≥ 1, got 0", "prune.colour: unknown key", "train.lr: must be < 1, got 5",
                   "train.batch_size: must be an integer, got 'big'", "train.zero_stage", "extra: unknown key"):
        assert any(line.startswith(needle) for line in lines), (needle, lines)
    assert len(lines) == 8 and str(info.value).count("\n") == 8  # a header, then one line each
    with pytest.raises(ConfigError, match=r"^train\.lr: must be > 0, got 0$"):
        TrainConfig(lr=0)
    with pytest.raises(ConfigError, match="train.epochs: must be a number, got True"):
        TrainConfig(epochs=True)  # YAML's true is not a number


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
    (lambda: LowRankConfig(ratio=0.5, energy=0.9), "lowrank: give exactly one of ratio or energy"),
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
    assert TrialConfig.model_validate(_json(c)) == c
