import json

import pytest
import torch

from workers import artifacts
from common.trial_config import StudentConfig
from common.errors import SlimrayError
from workers.shapes import keep_heads
from workers.student import build


def test_round_trip_reproduces_logits_exactly(tiny_bert, tiny_tokenizer, random_batch, tmp_path):
    info = artifacts.save(tiny_bert, tiny_tokenizer, tmp_path / "a", meta={"trial_config": {"x": 1}})
    model, tok, meta = artifacts.load(info.uri)
    with torch.no_grad():
        assert torch.equal(model(**random_batch).logits, tiny_bert(**random_batch).logits)
    assert meta["trial_config"] == {"x": 1} and tok.vocab_size == tiny_tokenizer.vocab_size
    assert info.size_bytes < info.artifact_bytes and len(info.sha256) == 64
    assert not list((tmp_path / "a").rglob("*.bin")) and not list((tmp_path / "a").rglob("*.pt"))


def test_uneven_heads_are_recorded_and_rebuilt(tiny_bert, random_batch, tmp_path):
    s = build(tiny_bert, StudentConfig())
    keep_heads(s.bert.encoder.layer[0], [0, 2, 3])
    keep_heads(s.bert.encoder.layer[1], [1])
    info = artifacts.save(s, None, tmp_path / "b")
    cfg = json.loads((tmp_path / "b" / "config.json").read_text())
    assert [x["heads"] for x in cfg["slimray_layers"]] == [3, 1]
    model, _, _ = artifacts.load(info.uri)
    assert model.bert.encoder.layer[1].attention.self.query.weight.shape == (16, 64)
    with torch.no_grad():
        assert torch.equal(model(**random_batch).logits, s(**random_batch).logits)
    full = artifacts.save(tiny_bert, None, tmp_path / "full")
    assert info.size_bytes < full.size_bytes


def test_sparse_weights_shrink_the_file(tiny_bert, random_batch, tmp_path):
    dense = artifacts.save(tiny_bert, None, tmp_path / "dense")
    for layer in tiny_bert.bert.encoder.layer:
        for lin in (layer.intermediate.dense, layer.output.dense):
            w = lin.weight.data
            w[w.abs() < w.abs().flatten().kthvalue(int(0.9 * w.numel())).values] = 0
    sparse = artifacts.save(tiny_bert, None, tmp_path / "sparse")
    assert sparse.size_bytes < dense.size_bytes
    model, _, _ = artifacts.load(sparse.uri)
    with torch.no_grad():
        assert torch.equal(model(**random_batch).logits, tiny_bert(**random_batch).logits)


def test_refuses_paths_outside_root_and_non_artifacts(tiny_bert, tmp_path):
    artifacts.save(tiny_bert, None, tmp_path / "root" / "ok")
    artifacts.load("ok", root=tmp_path / "root")
    with pytest.raises(SlimrayError, match="outside the artifact root"):
        artifacts.load("../elsewhere", root=tmp_path / "root")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(SlimrayError, match="not a slimray artifact"):
        artifacts.load(tmp_path / "junk")


def test_a_planted_pickle_is_never_unpickled(tiny_bert, random_batch, tmp_path):
    import pickle

    info = artifacts.save(tiny_bert, None, tmp_path / "a")
    canary = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(canary), "w"))

    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):
        (tmp_path / "a" / name).write_bytes(pickle.dumps(Payload()))
    model, _, _ = artifacts.load(info.uri)
    assert not canary.exists()
    with torch.no_grad():
        assert torch.equal(model(**random_batch).logits, tiny_bert(**random_batch).logits)
