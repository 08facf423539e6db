"""Vocabulary pruning: a student keeps only the word embeddings of the tokens its task uses.

Word embeddings are most of a small student's bytes, and a task uses a fraction of a 30k-token vocabulary. What is
kept: every token of the students' training rows, every special or added token, and every single character, plain
and ``##`` (so any word the original tokenizer could spell still splits into kept pieces instead of ``[UNK]``).

The model's embedding matrix is re-indexed to the kept tokens, in their original order, and the artifact ships a
real WordPiece tokenizer over exactly those tokens (the original normalizer, pre-tokenizer and post-processor, a
smaller vocabulary). Text is always tokenised by that tokenizer: WordPiece matches the longest known piece first,
so a word the original tokenizer split into kept pieces splits the same way, and only words needing a dropped
piece split differently. Training rows, tokenised once with the teacher's tokenizer, are only re-numbered
(:meth:`PrunedVocab.remap`): every one of their tokens is kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import ConfigError, TrialError
from workers.data import Encoded, Split, encode

__all__ = ["PrunedVocab", "prune_vocab", "reindex", "retokenise", "vocab_hash", "changed_rows"]


@dataclass(frozen=True)
class PrunedVocab:
    """``kept[i]`` is the original id of new token ``i`` (ascending); ``tokenizer`` tokenises into the new ids."""

    kept: np.ndarray
    tokenizer: object

    def remap(self, data: Encoded) -> Encoded:
        """``data`` (tokenised with the original tokenizer) in the new ids; refuses a row using a dropped token."""
        lookup = np.full(max(int(self.kept[-1]), int(data.input_ids.max())) + 1, -1, dtype=np.int64)
        lookup[self.kept] = np.arange(len(self.kept))
        ids = lookup[data.input_ids]
        real = np.arange(ids.shape[1])[None, :] < data.lengths[:, None]
        if (ids[real] < 0).any():
            row = int(np.nonzero((ids < 0) & real)[0][0])
            raise TrialError(f"vocab.prune: row {row} uses a token outside the kept vocabulary; keep the rows the "
                             "vocabulary was built from")
        ids[~real] = self.tokenizer.pad_token_id or 0
        return dataclasses.replace(data, input_ids=ids.astype(data.input_ids.dtype))


def _single_characters(vocab: dict, prefix: str) -> list[int]:
    return [i for tok, i in vocab.items() if len(tok) == 1 or (tok.startswith(prefix) and len(tok) == len(prefix) + 1)]


def _used(rows: Encoded) -> np.ndarray:
    real = np.arange(rows.input_ids.shape[1])[None, :] < rows.lengths[:, None]
    return np.unique(rows.input_ids[real])


def prune_vocab(tokenizer, *rows: Encoded) -> PrunedVocab:
    """The vocabulary ``rows`` (tokenised with ``tokenizer``) need, with every special token and single character,
    and a WordPiece tokenizer over it."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "WordPiece":
        raise ConfigError(f"vocab.prune: needs a WordPiece tokenizer, the teacher's is {model.get('type')}; "
                          "set vocab.prune to false")
    vocab = tokenizer.get_vocab()
    keep = set(_single_characters(vocab, model.get("continuing_subword_prefix", "##")))
    keep.update(tokenizer.all_special_ids)
    keep.update(int(i) for i in tokenizer.added_tokens_decoder)
    for r in rows:
        keep.update(int(i) for i in _used(r))
    kept = np.array(sorted(keep), dtype=np.int64)
    return PrunedVocab(kept, _wordpiece(tokenizer, state, kept))


def _renumber(processor: dict | None, ids: dict) -> None:
    """Point a post-processor's special tokens ([CLS], [SEP]) at their new ids."""
    if not processor:
        return
    for p in processor.get("processors") or []:  # a Sequence of processors
        _renumber(p, ids)
    for special in (processor.get("special_tokens") or {}).values():  # TemplateProcessing
        special["ids"] = [ids[t] for t in special["tokens"]]
    for key in ("sep", "cls"):  # BertProcessing, RobertaProcessing: [token, id]
        if isinstance(processor.get(key), list):
            processor[key] = [processor[key][0], ids[processor[key][0]]]


def _wordpiece(tokenizer, state: dict, kept: np.ndarray):
    """The original tokenizer with its WordPiece vocabulary cut to ``kept``, loaded back as an artifact loads it."""
    from transformers import AutoTokenizer

    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    tokens = [by_id[int(i)] for i in kept]
    ids = {t: n for n, t in enumerate(tokens)}
    state["model"]["vocab"] = ids
    for added in state.get("added_tokens") or []:
        added["id"] = ids[added["content"]]
    _renumber(state.get("post_processor"), ids)
    if state.get("padding"):
        state["padding"]["pad_id"] = ids[state["padding"]["pad_token"]]
    with tempfile.TemporaryDirectory(prefix="slimray-vocab-") as d:
        tokenizer.save_pretrained(d)
        (Path(d) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False))
        (Path(d) / "vocab.txt").write_text("".join(t + "\n" for t in tokens), encoding="utf-8")
        config = Path(d) / "tokenizer_config.json"
        if config.is_file():  # its added-token table is keyed by the old ids
            settings = json.loads(config.read_text())
            table = settings.get("added_tokens_decoder")
            if isinstance(table, dict):
                settings["added_tokens_decoder"] = {str(ids[v["content"]]): v for v in table.values()}
            config.write_text(json.dumps(settings, ensure_ascii=False, indent=2))
        pruned = AutoTokenizer.from_pretrained(d)
    if pruned.get_vocab() != ids:
        raise TrialError(f"vocab.prune: the pruned tokenizer did not load with its {len(ids)} tokens; set "
                         "vocab.prune to false")
    return pruned


def reindex(model, kept: np.ndarray, *, max_length: int | None = None):
    """``model`` with word embeddings for the ``kept`` ids only (new id i = original id ``kept[i]``) and, with
    ``max_length``, position embeddings for that many positions; the config follows. Returns ``model``."""
    import torch
    from torch import nn

    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding:
        raise TrialError(f"vocab.prune: the word embeddings are a {type(emb).__name__}, not an nn.Embedding; the "
                         "vocabulary must be pruned before quantization")
    new_id = {int(old): n for n, old in enumerate(kept)}
    pad = new_id.get(emb.padding_idx) if emb.padding_idx is not None else None
    small = nn.Embedding(len(kept), emb.embedding_dim, padding_idx=pad, dtype=emb.weight.dtype,
                         device=emb.weight.device)
    with torch.no_grad():
        small.weight.copy_(emb.weight[torch.as_tensor(kept, device=emb.weight.device)])
    model.set_input_embeddings(small)
    model.config.vocab_size = len(kept)
    if getattr(model.config, "pad_token_id", None) is not None:
        model.config.pad_token_id = new_id.get(model.config.pad_token_id, pad)
    if max_length is not None:
        _trim_positions(model, max_length)
    return model


def _trim_positions(model, max_length: int) -> None:
    import torch
    from torch import nn

    embeddings = getattr(model.base_model, "embeddings", None)
    pos = getattr(embeddings, "position_embeddings", None)
    if not isinstance(pos, nn.Embedding) or pos.num_embeddings <= max_length:
        return
    short = nn.Embedding(max_length, pos.embedding_dim, dtype=pos.weight.dtype, device=pos.weight.device)
    with torch.no_grad():
        short.weight.copy_(pos.weight[:max_length])
    embeddings.position_embeddings = short
    for name, buf in list(embeddings.named_buffers(recurse=False)):  # position_ids, token_type_ids
        if buf.dim() == 2 and buf.shape[1] == pos.num_embeddings:
            embeddings._buffers[name] = buf[:, :max_length].clone()
    model.config.max_position_embeddings = max_length


def retokenise(data: Encoded, tokenizer) -> Encoded:
    """``data``'s text tokenised again with ``tokenizer`` (same labels, same max length)."""
    if data.texts is None or data.max_length is None:
        raise TrialError("vocab.prune: the evaluation rows carry no text to tokenise with the pruned vocabulary; "
                         "encode them with workers.data.encode")
    texts = [tuple(t) if isinstance(t, list) else t for t in data.texts]
    return encode(Split(texts, data.labels), tokenizer, data.max_length)


def changed_rows(a: Encoded, b: Encoded, kept: np.ndarray) -> float:
    """Share of rows whose tokens differ between ``a`` (original ids) and ``b`` (the same rows, pruned ids)."""
    changed = 0
    for i in range(len(a)):
        old = a.input_ids[i, :a.lengths[i]].astype(np.int64)
        new = kept[b.input_ids[i, :b.lengths[i]].astype(np.int64)]
        changed += not np.array_equal(old, new)
    return changed / max(1, len(a))


def vocab_hash(tokenizer) -> str:
    """sha256 of the tokenizer's tokens in id order: what an artifact's embedding rows are indexed by."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    return hashlib.sha256("\n".join(tokens).encode("utf-8")).hexdigest()
