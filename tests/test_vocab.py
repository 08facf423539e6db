"""Vocabulary pruning: the kept tokens, the re-indexed embeddings, the artifact's own WordPiece tokenizer and its
vocabulary hash, a trial with ``vocab.prune``, and the search dimension."""
import copy
import shutil

import numpy as np
import pytest
import torch

from common.errors import DeployError, SlimrayError, SpecError, TrialError
from workers import artifacts
from common.trial_config import TrainConfig, TrialConfig
from workers.data import Split, TaskConfig, encode, load
from workers.vocab import changed_rows, prune_vocab, reindex, retokenise, vocab_hash

TRAIN = ["the movie was good", "a great film , really fun", "the plot was a mess", "bad actors and a dull story"]
UNSEEN = "boring"  # a whole word of the original vocabulary that no training row uses


def _rows(texts, tokenizer, max_length=32):
    return encode(Split(list(texts), np.zeros(len(texts), dtype=np.int64)), tokenizer, max_length)


@pytest.fixture
def pruned(tiny_bert, tiny_tokenizer, tmp_path):
    """(the unpruned model, the PrunedVocab, a saved vocabulary-pruned artifact's uri)."""
    vocab = prune_vocab(tiny_tokenizer, _rows(TRAIN, tiny_tokenizer))
    model = reindex(copy.deepcopy(tiny_bert), vocab.kept, max_length=32)
    uri = artifacts.save(model, vocab.tokenizer, tmp_path / "pruned", meta={"task": {"max_length": 32}}).uri
    return tiny_bert, vocab, uri


def test_kept_tokens_are_the_rows_specials_and_single_characters(pruned, tiny_tokenizer):
    _, vocab, _ = pruned
    kept = set(tiny_tokenizer.convert_ids_to_tokens(vocab.kept.tolist()))
    assert {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "movie", "mess", "dull", ","} <= kept
    assert set("abcxyz0.!") <= kept and {"##a", "##q", "##z"} <= kept
    assert UNSEEN not in kept and "w500" not in kept and "[unused7]" not in kept
    assert len(vocab.tokenizer) == len(vocab.kept) < len(tiny_tokenizer) / 5


def test_pruned_artifact_gives_the_unpruned_logits_on_kept_text(pruned, tiny_tokenizer):
    from deploy.classifier import Classifier

    model, vocab, uri = pruned
    texts = ["the movie was a fun mess", "really good actors", ("a dull film", "great story")]
    served = Classifier.load(uri)
    assert vocab_hash(served.tokenizer) == vocab_hash(vocab.tokenizer) != vocab_hash(tiny_tokenizer)
    with torch.no_grad():
        for text in texts:
            args = text if isinstance(text, tuple) else (text,)
            full = model(**tiny_tokenizer(*args, return_tensors="pt")).logits
            assert torch.allclose(served.logits([text]), full, atol=1e-5)
            # the same pieces, in the new ids
            new = served.tokenizer(*args)["input_ids"]
            assert vocab.kept[new].tolist() == tiny_tokenizer(*args)["input_ids"]


def test_an_unseen_word_splits_into_kept_pieces_not_unk(pruned, tiny_tokenizer):
    _, vocab, uri = pruned
    _, tok, _ = artifacts.load(uri)
    pieces = tok.tokenize(f"the {UNSEEN} movie")
    assert tiny_tokenizer.tokenize(UNSEEN) == [UNSEEN]
    assert tok.unk_token not in pieces and pieces[0] == "the" and pieces[-1] == "movie" and len(pieces) > 3
    assert tok.convert_tokens_to_string(pieces[1:-1]) == UNSEEN
    ids = tok(f"the {UNSEEN} movie")["input_ids"]
    assert tok.unk_token_id not in ids and max(ids) < len(vocab.kept)


def test_loading_with_another_tokenizer_is_an_error(pruned, tiny_tokenizer, tmp_path):
    from deploy.classifier import Classifier

    model, vocab, uri = pruned
    shutil.rmtree(f"{uri}/tokenizer")
    tiny_tokenizer.save_pretrained(f"{uri}/tokenizer")  # the teacher's full vocabulary beside pruned embeddings
    with pytest.raises(SlimrayError, match="not the one the model was saved with") as err:
        artifacts.load(uri)
    assert "\n" not in str(err.value)
    loaded, _, meta = artifacts.load(uri, with_tokenizer=False)
    with pytest.raises(DeployError, match="artifact's own tokenizer"):
        Classifier(loaded, tiny_tokenizer, meta, uri)


def test_the_onnx_export_serves_through_the_pruned_tokenizer(pruned, tiny_tokenizer, tmp_path):
    pytest.importorskip("onnxruntime")
    from deploy import ort_backend
    from deploy.classifier import Classifier
    from workers.export import export

    _, vocab, uri = pruned
    _, tok, _ = artifacts.load(uri)
    export(uri, tmp_path / "onnx", rows=retokenise(_rows(TRAIN + [f"a {UNSEEN} plot"], tiny_tokenizer), tok))
    served, reference = ort_backend.load(tmp_path / "onnx"), Classifier.load(uri)
    assert vocab_hash(served.tokenizer) == vocab_hash(vocab.tokenizer)
    texts = [f"the {UNSEEN} film", "a great movie"]
    assert torch.allclose(served.logits(texts), reference.logits(texts), atol=1e-4)


def test_embeddings_are_reindexed_before_low_bit_embeddings(tiny_bert, tiny_tokenizer, tmp_path):
    from common.trial_config import Int4WeightOnly
    from workers.quantize import quantize

    vocab = prune_vocab(tiny_tokenizer, _rows(TRAIN, tiny_tokenizer))
    full = quantize(copy.deepcopy(tiny_bert), Int4WeightOnly(embedding_bits=4))
    small = quantize(reindex(copy.deepcopy(tiny_bert), vocab.kept, max_length=32), Int4WeightOnly(embedding_bits=4))
    a = artifacts.save(full, tiny_tokenizer, tmp_path / "full")
    b = artifacts.save(small, vocab.tokenizer, tmp_path / "small")
    assert b.size_bytes < a.size_bytes
    loaded, tok, _ = artifacts.load(b.uri)
    assert loaded.config.vocab_size == len(vocab.kept) and loaded.config.max_position_embeddings == 32
    text = "the plot was good"
    with torch.no_grad():  # int4 rows are quantized one by one: the same rows give the same values
        assert torch.allclose(loaded(**tok(text, return_tensors="pt")).logits,
                              full(**tiny_tokenizer(text, return_tensors="pt")).logits, atol=1e-5)


def test_remap_refuses_a_row_with_a_dropped_token(tiny_tokenizer):
    vocab = prune_vocab(tiny_tokenizer, _rows(TRAIN, tiny_tokenizer))
    assert vocab.remap(_rows(TRAIN[:2], tiny_tokenizer)).input_ids.max() < len(vocab.kept)
    with pytest.raises(TrialError, match="vocab.prune: row 1"):
        vocab.remap(_rows(["good", f"a {UNSEEN} film"], tiny_tokenizer))


def test_retokenised_rows_and_changed_share(tiny_tokenizer):
    vocab = prune_vocab(tiny_tokenizer, _rows(TRAIN, tiny_tokenizer))
    dev = _rows(["the movie was good", f"a {UNSEEN} film", "fun"], tiny_tokenizer)
    again = retokenise(dev, vocab.tokenizer)
    assert again.max_length == 32 and list(again.labels) == list(dev.labels)
    assert changed_rows(dev, again, vocab.kept) == pytest.approx(1 / 3)


# --------------------------------------------------------------------------- a trial

@pytest.fixture(scope="module")
def tiny_prepared(tiny_teacher_dir, tiny_task_dir, tmp_path_factory):
    from workers.teacher import prepare

    data = load(TaskConfig(dataset=str(tiny_task_dir), train_size=128, eval_size=64, max_length=32))
    return prepare(str(tiny_teacher_dir), data, TrainConfig(lr=1e-3, epochs=1, batch_size=16),
                   tmp_path_factory.mktemp("teachers"))


def _trial(t, tmp_path, name, vocab_prune: bool, **over):
    from workers.trial import TrialContext, run

    cfg = TrialConfig.model_validate({"student": {"layers": 1}, "quant": {"mode": "dynamic"},
                                      "vocab": {"prune": vocab_prune},
                                      "train": {"max_steps": 3, "batch_size": 16}, **over})
    ctx = TrialContext(teacher_uri=t.uri, teacher_metrics=t.metrics, train=t.train, eval=t.eval,
                       teacher_logits=t.train_logits, metric="accuracy", out_dir=str(tmp_path / name), seq_len=64,
                       latency_runs=2)
    return run(cfg, ctx)


def test_a_trial_with_vocab_pruning_runs_end_to_end_and_is_smaller(tiny_prepared, tmp_path):
    from deploy.classifier import Classifier
    from workers.evaluate import predict_logits, task_metrics

    t = tiny_prepared
    plain = _trial(t, tmp_path, "plain", False)
    small = _trial(t, tmp_path, "small", True)
    assert small["size_bytes"] < plain["size_bytes"] and small["artifact_bytes"] < plain["artifact_bytes"]
    model, tok, meta = artifacts.load(small["artifact_uri"])
    assert meta["trial_config"]["vocab"] == {"prune": True} and meta["vocab_sha256"] == vocab_hash(tok)
    assert len(tok) == model.config.vocab_size < 300 and model.config.max_position_embeddings == 32
    # the metric is the artifact's on the dev text tokenised by its own tokenizer
    dev = encode(Split(t.eval.texts, t.eval.labels), tok, 32)
    assert small["metric"] == pytest.approx(task_metrics(predict_logits(model, dev), dev.labels, "accuracy")["metric"])
    # served: any text, words never seen in training included, through the pruned tokenizer
    served = Classifier.load(small["artifact_uri"])
    assert len(served.tokenizer) == len(tok) and served.max_length == 32
    answers = served(["a zzyzx qwerty unheard-of film !", ("the plot", "boring " * 80)])
    assert [a["label"] for a in answers] and all(0 <= a["score"] <= 1 for a in answers)


def test_hidden_state_kd_reads_the_renumbered_rows(tiny_prepared, tmp_path):
    result = _trial(tiny_prepared, tmp_path, "kd", True, distill={"hidden_weight": 1.0, "attention_weight": 1.0})
    assert result["train_steps"] == 3 and np.isfinite(result["train_loss"])


# --------------------------------------------------------------------------- config and search

def test_vocab_prune_is_a_search_dimension_and_a_job_option(tmp_path):
    from orchestrator.spec import parse
    from orchestrator.trainable import TrialSettings
    from search.adapters import trial_config
    from search.space import SearchSpace

    space = SearchSpace.model_validate({"vocab": {"prune": [False, True]}})
    assert space.options("vocab.prune") == (False, True)
    assert space.model_dump(mode="json") == {"vocab": {"prune": [False, True]}}
    assert trial_config({"vocab.prune": True}).vocab.prune is True
    for bad, says in (([0, 1], "must be true or false, got 0"), ({"low": 0, "high": 1}, "not a range")):
        with pytest.raises(SpecError, match=says):
            SearchSpace.model_validate({"vocab": {"prune": bad}})
    spec = parse({"name": "v", "vocab": {"prune": True}, "search": {"student": {"layers": [1, 2]}}})
    base = TrialSettings(spec=spec, job_id="j", out_root=str(tmp_path), provenance={}).base
    assert trial_config({"student.layers": 1}, base).vocab.prune is True
    assert trial_config({"vocab.prune": False}, base).vocab.prune is False
    schema = spec.model_json_schema()
    assert "vocab" in schema["properties"]
    with pytest.raises(SpecError, match="vocab.prune"):
        parse({"name": "v", "vocab": {"prune": "yes"}})
