"""The elastic strategy's worker side: the super-student's prefix order, sub-configurations, slicing, sandwich
training (with resume) and training-free sub-model trials, on tiny BERTs built from a config."""
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common.elastic_config import ElasticConfig, SubConfig, SubSpace
from common.errors import ConfigError
from common.trial_config import (DistillConfig, DynamicInt8, Int4WeightOnly, QatInt8, StaticInt8, StudentConfig,
                                 TrainConfig)
from workers import artifacts, supernet
from workers.data import Encoded
from workers.elastic import SubEval, draw, evaluate_sub, train_super, with_pruned_vocab
from workers.evaluate import predict_logits, task_metrics
from workers.student import build, pick_layers

# the tiny 4-layer teacher has 4 heads of 16 dims and 128 FFN neurons per layer
SPACE = SubSpace(depths=(1, 2, 4), heads=(1, 2, 4), ffn=(32, 64, 128))


def _data(n=64, seq=12):
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 1000, (n, seq)).astype(np.int32)
    return Encoded(ids, np.zeros_like(ids, dtype=np.int8), np.full(n, seq), (ids[:, 1] % 2).astype(np.int64))


def _teacher_logits(n=64):
    return np.random.default_rng(1).normal(size=(n, 2)).astype(np.float32)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _super(teacher, space=SPACE, **cfg):
    cfg = ElasticConfig(importance_samples=32, **cfg)
    return supernet.build_super(teacher, space, cfg, _data(), _teacher_logits()).eval()


# --------------------------------------------------------------------------- configs

@pytest.mark.parametrize("bad, field", [
    ({"samples_per_step": -1}, "samples_per_step"),
    ({"sandwich": False, "samples_per_step": 0}, "samples_per_step"),
    ({"layer_choice": "middle"}, "layer_choice"),
    ({"steps": 0}, "steps"),
    ({"epochs": 0}, "epochs"),
    ({"finalists": -1}, "finalists"),
    ({"finalist_steps": 0}, "finalist_steps"),
    ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"sandwich": "yes"}, "sandwich"),
    ({"sub_models": 3}, "sub_models"),
])
def test_bad_elastic_values_are_rejected_in_one_line_naming_the_field(bad, field):
    with pytest.raises(ConfigError) as err:
        ElasticConfig(**bad)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"elastic.{field}: ")


def test_elastic_configs_round_trip_through_json():
    for cfg in (ElasticConfig(steps=10, samples_per_step=0, layer_choice="top", finalists=5, finalist_steps=50),
                SPACE, SubConfig(depth=2, heads=1, ffn=64)):
        assert type(cfg).model_validate(json.loads(cfg.model_dump_json())) == cfg
    assert SubSpace(depths=(4, 1, 1), heads=(2,), ffn=(8, 4)).depths == (1, 4)  # sorted, no repeats
    with pytest.raises(ConfigError, match=r"^search\.student\.heads: must have at least 1"):
        SubSpace(depths=(1,), heads=(), ffn=(4,))
    with pytest.raises(ConfigError, match=r"^sub\.ffn: must be ≥ 1"):
        SubConfig(depth=1, heads=1, ffn=0)


def test_draw_is_seeded_by_the_step_and_sandwiches():
    cfg = ElasticConfig(samples_per_step=3)
    steps = [draw(SPACE, cfg, step, seed=7) for step in range(20)]
    assert steps[5] == draw(SPACE, cfg, 5, seed=7)  # a resumed run (or another rank) draws the same
    assert all(s[:2] == [SPACE.largest, SPACE.smallest] and len(s) == 5 for s in steps)
    assert all(sub in SPACE for s in steps for sub in s)
    assert len({tuple(s[2:]) for s in steps}) > 10  # the random ones do change with the step
    assert draw(SPACE, cfg, 5, seed=8) != steps[5]
    plain = draw(SPACE, ElasticConfig(sandwich=False, samples_per_step=2), 5)
    assert len(plain) == 2


# --------------------------------------------------------------------------- the super-student

def test_reordering_keeps_the_full_models_logits_and_puts_dead_units_last(tiny_bert_4l, random_batch):
    layer0 = tiny_bert_4l.bert.encoder.layer[0]
    layer0.attention.output.dense.weight.data[:, :16] = 0  # head 0 contributes nothing
    layer0.output.dense.weight.data[:, 0] = 0  # neither does FFN neuron 0
    plain = build(tiny_bert_4l, StudentConfig(layers=4)).eval()
    sup = _super(tiny_bert_4l)
    assert torch.allclose(_logits(sup, random_batch), _logits(plain, random_batch), atol=1e-5)
    with supernet.at(sup, SPACE.largest):
        assert torch.allclose(_logits(sup, random_batch), _logits(plain, random_batch), atol=1e-5)
    q_plain, q_sup = (m.bert.encoder.layer[0].attention.self.query.weight for m in (plain, sup))
    assert not torch.equal(q_sup, q_plain)  # reordered...
    assert torch.equal(q_sup[-16:], q_plain[:16])  # ...with the dead head last
    up_plain, up_sup = (m.bert.encoder.layer[0].intermediate.dense.weight for m in (plain, sup))
    assert torch.equal(up_sup[-1], up_plain[0])


def test_the_space_is_checked_against_the_teacher(tiny_bert_4l):
    with pytest.raises(ConfigError, match=r"^search\.student\.heads: must be ≤ the teacher's 4 heads per layer, "
                                          r"got 8"):
        _super(tiny_bert_4l, SubSpace(depths=(2,), heads=(8,), ffn=(64,)))
    sup = _super(tiny_bert_4l, SubSpace(depths=(2, 3), heads=(1, 2), ffn=(16, 96)))  # cut to the largest widths
    layers = sup.bert.encoder.layer
    assert len(layers) == 3 and layers[0].attention.self.query.weight.shape == (32, 64)
    assert layers[0].intermediate.dense.weight.shape == (96, 64)
    with pytest.raises(ConfigError, match=r"^sub\.heads: must be ≤ the super-student's 2 heads per layer, got 4"):
        with supernet.at(sup, SubConfig(depth=2, heads=4, ffn=16)):
            pass


@pytest.mark.parametrize("choice", ["uniform", "top"])
def test_a_sliced_sub_model_computes_what_the_super_student_does_at_it_and_saves_smaller(
        tiny_bert_4l, random_batch, tmp_path, choice):
    sup = _super(tiny_bert_4l, layer_choice=choice)
    full = _logits(sup, random_batch)
    sub = SubConfig(depth=2, heads=2, ffn=64)
    with supernet.at(sup, sub):
        at_sub = _logits(sup, random_batch)
    assert not torch.allclose(at_sub, full, atol=1e-3)  # the sub-configuration is really a different model
    assert torch.equal(_logits(sup, random_batch), full)  # and leaving it restores the super-student

    sliced = supernet.slice(sup, sub)
    assert torch.allclose(_logits(sliced, random_batch), at_sub, atol=1e-5)
    assert torch.equal(_logits(sup, random_batch), full)  # slicing copies; the super-student is unchanged
    whole = artifacts.save(sup, None, tmp_path / "super")
    info = artifacts.save(sliced, None, tmp_path / "sub")
    assert artifacts.size_bytes(sliced) == info.size_bytes < whole.size_bytes
    with safe_open(str(tmp_path / "sub" / "model.safetensors"), framework="pt") as fh:
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in fh.keys()}
    assert {k.split(".")[3] for k in shapes if k.startswith("bert.encoder.layer.")} == {"0", "1"}
    for i in range(2):
        p = f"bert.encoder.layer.{i}."
        assert shapes[p + "attention.self.query.weight"] == (32, 64)
        assert shapes[p + "attention.self.value.bias"] == (32,)
        assert shapes[p + "attention.output.dense.weight"] == (64, 32)
        assert shapes[p + "intermediate.dense.weight"] == (64, 64)
        assert shapes[p + "output.dense.weight"] == (64, 64)
    loaded, _, _ = artifacts.load(info.uri)
    assert torch.allclose(_logits(loaded, random_batch), at_sub, atol=1e-5)
    # the layers a depth keeps follow the layer choice: the sliced layer 0 is super-student layer 1 (uniform) or 2
    first = pick_layers(4, 2, choice)[0]
    assert torch.equal(loaded.bert.encoder.layer[0].attention.self.query.weight,
                       sup.bert.encoder.layer[first].attention.self.query.weight[:32])


def test_the_super_student_round_trips_as_an_artifact(tiny_bert_4l, random_batch, tmp_path):
    sup = _super(tiny_bert_4l, layer_choice="top")
    sub = SubConfig(depth=1, heads=1, ffn=32)
    with supernet.at(sup, sub):
        expected = _logits(sup, random_batch)
    artifacts.save(sup, None, tmp_path / "super")
    back, _, _ = supernet.load_super(tmp_path / "super")
    assert supernet.space_of(back) == SPACE
    with supernet.at(back, sub):
        assert torch.allclose(_logits(back, random_batch), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="not a super-student"):
        supernet.load_super(artifacts.save(supernet.slice(sup, sub), None, tmp_path / "sub").uri)


# --------------------------------------------------------------------------- training

def _train(sup, out_dir, cfg: ElasticConfig, progress=None):
    return train_super(sup, _data(), cfg, DistillConfig(), TrainConfig(lr=1e-3, batch_size=16, seed=3),
                       out_dir, teacher_logits=_teacher_logits(), progress=progress)


def test_a_sandwich_step_trains_the_largest_the_smallest_and_the_drawn_sub_configurations(tiny_bert_4l, tmp_path):
    sup = _super(tiny_bert_4l)
    runs = []  # per forward pass of the student: (layer index, heads, FFN neurons) of each layer that ran
    sup.register_forward_pre_hook(lambda *_: runs.append([]))
    for i, layer in enumerate(sup.bert.encoder.layer):
        layer.attention.self.query.register_forward_hook(
            lambda m, a, out, i=i: runs[-1].append([i, out.shape[-1] // 16, None]))
        layer.intermediate.dense.register_forward_hook(lambda m, a, out: runs[-1][-1].__setitem__(2, out.shape[-1]))
    before = {k: v.clone() for k, v in sup.state_dict().items()}
    cfg = ElasticConfig(steps=2, samples_per_step=2, checkpoint_every=10)
    res = _train(sup, tmp_path, cfg)
    assert res.steps == 2 and res.resumed_from == 0

    used = []
    for run in runs:
        layers, heads, ffn = zip(*run)
        assert len(set(heads)) == 1 and len(set(ffn)) == 1  # every kept layer runs at the same widths
        assert list(layers) == pick_layers(4, len(layers), "uniform")
        used.append(SubConfig(depth=len(layers), heads=heads[0], ffn=ffn[0]))
    assert used == draw(SPACE, cfg, 0, seed=3) + draw(SPACE, cfg, 1, seed=3)
    for step in (used[:4], used[4:]):
        assert SPACE.largest in step and SPACE.smallest in step
    # the one optimizer step per batch moved the weights only the largest sub-configuration reaches, too
    last = "bert.encoder.layer.3.intermediate.dense.weight"
    assert not torch.equal(sup.state_dict()[last][-1], before[last][-1])


def test_sandwich_training_takes_hidden_state_and_attention_losses_at_every_depth_and_width(tiny_bert_4l, tmp_path):
    sup = _super(tiny_bert_4l)
    cfg = ElasticConfig(steps=1, samples_per_step=2)
    losses = []
    res = train_super(sup, _data(), cfg, DistillConfig(hidden_weight=1.0, attention_weight=1.0),
                      TrainConfig(batch_size=16), tmp_path, teacher=tiny_bert_4l,
                      progress=lambda s, t, loss: losses.append(loss))
    assert res.steps == 1 and len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0


def test_a_killed_super_student_resumes_from_its_checkpoint(tiny_bert_4l, tmp_path, random_batch):
    class Killed(Exception):
        pass

    def kill_at_2(step, total, loss):
        if step == 2:
            raise Killed

    cfg = ElasticConfig(steps=4, checkpoint_every=2, samples_per_step=1)
    with pytest.raises(Killed):
        _train(_super(tiny_bert_4l), tmp_path / "run", cfg, progress=kill_at_2)
    seen = []
    res = _train(_super(tiny_bert_4l), tmp_path / "run", cfg, progress=lambda s, t, loss: seen.append((s, t)))
    assert res.resumed_from == 2 and res.steps == 4 and seen == [(3, 4), (4, 4)]
    kept = [d.name for d in (tmp_path / "run" / "checkpoints").glob("global_step*")]
    assert kept == ["global_step4"]  # older checkpoints are deleted

    # resuming reproduces the uninterrupted run: same data order, same sub-configurations, same optimizer state
    straight = _super(tiny_bert_4l)
    _train(straight, tmp_path / "straight", cfg)
    resumed, _, _ = supernet.load_super(res.uri)
    assert not torch.allclose(_logits(resumed, random_batch), _logits(_super(tiny_bert_4l), random_batch), atol=1e-3)
    for sub in (SPACE.largest, SPACE.smallest):
        with supernet.at(resumed, sub), supernet.at(straight.eval(), sub):
            assert torch.allclose(_logits(resumed, random_batch), _logits(straight, random_batch), atol=1e-5)


# --------------------------------------------------------------------------- sub-model trials

@pytest.mark.parametrize("quant", [None, DynamicInt8(), StaticInt8(calibration_samples=16),
                                   Int4WeightOnly(group_size=16)], ids=lambda q: type(q).__name__)
def test_a_sub_model_trial_scores_sizes_and_times_what_it_would_save(tiny_bert_4l, tmp_path, quant):
    sup = _super(tiny_bert_4l)
    data = _data()
    ev = SubEval(split=data, metric="accuracy", calibration=data, teacher_metric=90.0, seq_len=16, latency_runs=2)
    small = evaluate_sub(sup, SubConfig(depth=1, heads=1, ffn=32), quant, ev, save_to=tmp_path / "small")
    big = evaluate_sub(sup, SubConfig(depth=4, heads=4, ffn=128), quant, ev)
    assert "artifact_uri" not in big and small["size_bytes"] < big["size_bytes"]
    assert small["size_bytes"] == artifacts.info(small["artifact_uri"]).size_bytes
    assert small["latency_ms_b1"] > 0 and small["metric_drop"] == 90.0 - small["metric"]
    assert (small["sub_depth"], small["sub_heads"], small["sub_ffn"]) == (1, 1, 32)
    loaded, _, meta = artifacts.load(small["artifact_uri"])
    assert task_metrics(predict_logits(loaded, data), data.labels, "accuracy")["metric"] == small["metric"]
    assert meta["trial_config"]["sub"] == {"depth": 1, "heads": 1, "ffn": 32}
    if quant is not None:
        plain = evaluate_sub(sup, SubConfig(depth=1, heads=1, ffn=32), None, ev)
        assert small["size_bytes"] < plain["size_bytes"] / 2


def test_a_sub_model_trial_with_a_pruned_vocabulary(tiny_bert_4l, tiny_tokenizer, tmp_path):
    from workers.data import Split, encode
    from workers.vocab import retokenise

    rng = np.random.default_rng(0)

    def rows(n, words):
        texts = [" ".join(rng.choice(words, 6)) for _ in range(n)]
        return encode(Split(texts, rng.integers(0, 2, n)), tiny_tokenizer, 16)

    words = "good bad great awful movie film story plot the a is was very".split()
    train, dev = rows(64, words), rows(32, words + ["boring"])  # a dev word the training rows never use
    sup, sub = _super(tiny_bert_4l), SubConfig(depth=2, heads=2, ffn=64)
    ev = SubEval(split=dev, metric="accuracy", calibration=train, seq_len=16, latency_runs=2)
    full = evaluate_sub(sup, sub, StaticInt8(calibration_samples=16), ev)
    pruned = evaluate_sub(sup, sub, StaticInt8(calibration_samples=16), with_pruned_vocab(ev, tiny_tokenizer, train),
                          save_to=tmp_path / "pruned")
    assert pruned["vocab_tokens"] < full["vocab_tokens"] / 2 and pruned["size_bytes"] < full["size_bytes"]
    loaded, tokenizer, meta = artifacts.load(pruned["artifact_uri"])  # with its own, smaller tokenizer
    assert len(tokenizer) == pruned["vocab_tokens"] and meta["trial_config"]["vocab"] == {"prune": True}
    served = retokenise(dev, tokenizer)
    assert task_metrics(predict_logits(loaded, served), served.labels, "accuracy")["metric"] == pruned["metric"]


def test_a_sub_model_trial_refuses_qat(tiny_bert_4l):
    ev = SubEval(split=_data(), metric="accuracy")
    with pytest.raises(ConfigError, match=r"^quant\.mode: qat needs training"):
        evaluate_sub(_super(tiny_bert_4l), SPACE.smallest, QatInt8(), ev)
