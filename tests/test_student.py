import pytest
import torch

from common.trial_config import StudentConfig
from common.errors import ConfigError
from workers.shapes import layer_shapes
from workers.student import build, pick_layers


def test_pick_layers():
    assert pick_layers(6, 3, "uniform") == [1, 3, 5]
    assert pick_layers(6, 2, "bottom") == [0, 1]
    assert pick_layers(6, 2, "top") == [4, 5]
    assert pick_layers(4, 4, "uniform") == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="student.layers"):
        pick_layers(6, 7, "uniform")


def test_student_copies_teacher_layers(tiny_bert_4l, random_batch):
    s = build(tiny_bert_4l, StudentConfig(layers=2, layer_choice="top"))
    assert s.config.num_hidden_layers == 2
    t_layers = tiny_bert_4l.bert.encoder.layer
    assert torch.equal(s.bert.encoder.layer[0].attention.self.query.weight, t_layers[2].attention.self.query.weight)
    assert s.bert.encoder.layer[0].attention.self.query.weight.data_ptr() != \
        t_layers[2].attention.self.query.weight.data_ptr()  # a copy, the teacher stays intact
    assert s(**random_batch).logits.shape == (4, 2)


def test_same_shape_student_equals_teacher(tiny_bert, random_batch):
    s = build(tiny_bert, StudentConfig())
    s.eval()
    with torch.no_grad():
        assert torch.equal(s(**random_batch).logits, tiny_bert(**random_batch).logits)


def test_narrow_ffn_heads_and_hidden(tiny_bert, random_batch):
    s = build(tiny_bert, StudentConfig(ffn=32, heads=2))
    assert layer_shapes(s) == [{"heads": 2, "head_dim": 16, "ffn": 32}] * 2
    assert s(**random_batch).logits.shape == (4, 2)
    n = build(tiny_bert, StudentConfig(hidden=32))
    assert n.config.hidden_size == 32 and n.bert.embeddings.word_embeddings.weight.shape == (1000, 32)
    assert n(**random_batch).logits.shape == (4, 2)
    with pytest.raises(ConfigError, match="student.ffn"):
        build(tiny_bert, StudentConfig(ffn=4096))
    with pytest.raises(ConfigError, match="student.hidden"):
        build(tiny_bert, StudentConfig(hidden=30))
