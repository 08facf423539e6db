import numpy as np
import pytest
import torch

from common.trial_config import DistillConfig, TrainConfig
from workers.data import Encoded
from workers.distill import attention_loss, distill, hidden_loss, kd_loss, layer_map
from workers.student import build
from common.trial_config import StudentConfig


def _data(n=64, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, 1000, (n, seq)).astype(np.int32)
    labels = (ids[:, 1] % 2).astype(np.int64)  # learnable: parity of the first real token
    return Encoded(ids, np.zeros_like(ids, dtype=np.int8), np.full(n, seq), labels)


def test_kd_loss_properties():
    s = torch.tensor([[2.0, -1.0], [0.5, 0.3]])
    labels = torch.tensor([0, 1])
    ce = torch.nn.functional.cross_entropy(s, labels)
    assert torch.allclose(kd_loss(s, None, labels, 2.0, 0.9), ce)
    assert torch.allclose(kd_loss(s, s.clone(), labels, 2.0, 1.0), torch.tensor(0.0), atol=1e-6)
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # the T² factor: the soft term at T=4 is ~16× the KL of the softened distributions
    kl4 = torch.nn.functional.kl_div(torch.log_softmax(s / 4, -1), torch.softmax(t / 4, -1), reduction="batchmean")
    assert torch.allclose(kd_loss(s, t, labels, 4.0, 1.0), 16 * kl4, rtol=1e-5)


def test_layer_map_and_aux_losses(tiny_bert_4l, random_batch):
    assert layer_map(2, 4) == [(0, 0), (1, 2), (2, 4)]
    s = build(tiny_bert_4l, StudentConfig(layers=2))
    tiny_bert_4l.config._attn_implementation = "eager"
    s.config._attn_implementation = "eager"
    so = s(**random_batch, output_hidden_states=True, output_attentions=True)
    to = tiny_bert_4l(**random_batch, output_hidden_states=True, output_attentions=True)
    mask = random_batch["attention_mask"]
    # the uniform student copies layers 1 and 3 (0-based) so its layer-j output equals the teacher's only at j=0
    assert hidden_loss(to.hidden_states, to.hidden_states, mask, None).item() == 0
    assert hidden_loss(so.hidden_states, to.hidden_states, mask, None).item() > 0
    assert attention_loss(to.attentions, to.attentions, mask).abs().item() < 1e-6
    assert attention_loss(so.attentions, to.attentions, mask).item() > 0


def test_distill_on_deepspeed_learns(tiny_bert):
    data = _data(128)
    student = build(tiny_bert, StudentConfig())
    before = torch.nn.functional.cross_entropy(student(**{k: v for k, v in data.batch(range(64)).items()
                                                          if k != "labels"}).logits,
                                               torch.from_numpy(data.labels[:64])).item()
    res = distill(student, data, DistillConfig(alpha=0.0), TrainConfig(lr=3e-3, epochs=8, batch_size=16))
    after = torch.nn.functional.cross_entropy(student(**{k: v for k, v in data.batch(range(64)).items()
                                                         if k != "labels"}).logits,
                                              torch.from_numpy(data.labels[:64])).item()
    assert res.steps == 64 and after < before * 0.7


def test_distill_follows_teacher_logits_and_accumulates(tiny_bert):
    data = _data(64)
    target = np.stack([np.full(64, 3.0), np.full(64, -3.0)], 1).astype(np.float32)  # teacher: always class 0
    student = build(tiny_bert, StudentConfig())
    seen = []
    res = distill(student, data, DistillConfig(alpha=1.0, temperature=1.0),
                  TrainConfig(lr=3e-3, epochs=10, max_steps=12, batch_size=8, grad_accum=2),
                  teacher_logits=target, callbacks=[lambda s, t, m: seen.append((s, t))])
    assert res.steps == 12 and seen[-1] == (12, 12) and len(seen) == 12
    probs = torch.softmax(student(**{k: v for k, v in data.batch(range(16)).items() if k != "labels"}).logits, -1)
    assert probs[:, 0].mean() > 0.9


def test_distill_with_hidden_and_attention_losses(tiny_bert_4l):
    data = _data(32)
    student = build(tiny_bert_4l, StudentConfig(layers=2, hidden=32))
    res = distill(student, data, DistillConfig(hidden_weight=1.0, attention_weight=1.0), TrainConfig(max_steps=3,
                  batch_size=8), teacher=tiny_bert_4l)
    assert res.steps == 3 and np.isfinite(res.loss)
    with pytest.raises(ValueError, match="teacher"):
        distill(student, data, DistillConfig(hidden_weight=1.0), TrainConfig(max_steps=1, batch_size=8))


def test_checkpoint_resume_continues(tiny_bert, tmp_path):
    data = _data(64)
    s1 = build(tiny_bert, StudentConfig())
    distill(s1, data, DistillConfig(alpha=0), TrainConfig(max_steps=4, batch_size=8), checkpoint_dir=str(tmp_path),
            checkpoint_every=2)
    s2 = build(tiny_bert, StudentConfig())
    res = distill(s2, data, DistillConfig(alpha=0), TrainConfig(epochs=2, max_steps=6, batch_size=8),
                  checkpoint_dir=str(tmp_path), checkpoint_every=2, resume=True)
    assert res.resumed_from == 4 and res.steps == 6
