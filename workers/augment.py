"""Teacher-labelled augmentation of the students' training rows (TinyBERT-style, nothing from outside).

Each copy of a row replaces some words by one of their nearest neighbours in the teacher's own word-embedding
matrix (cosine similarity; only words that are one token, and only neighbours that already occur in the
training rows, so augmentation never grows a pruned vocabulary) and masks some others. The two sides of a
pair are augmented on their own. Augmented rows carry no label: the teacher's logits are their only target.
A row's copies depend only on (seed, copy, row index), so the same settings give the same rows.
"""
from __future__ import annotations

import random
from typing import ClassVar

import numpy as np
from pydantic import Field

from common.config import Float, Frozen, Int

__all__ = ["AugmentConfig", "NO_LABEL", "Augmenter", "neighbour_table", "job_problems"]

NO_LABEL = -100  # cross-entropy's ignore_index: an augmented row adds nothing to the hard-label loss


class AugmentConfig(Frozen):
    """Augmented copies of the students' training rows, labelled by the teacher."""

    _prefix: ClassVar[str] = "task.augment"

    copies: Int = Field(0, ge=0, description="augmented copies of each training row (0: no augmentation)")
    replace_prob: Float = Field(0.4, ge=0, le=1, description="chance that a one-token word is replaced by a "
                                                             "nearest neighbour in the teacher's word embeddings")
    mask_prob: Float = Field(0.1, ge=0, le=1, description="chance that a word (not replaced) is masked")
    neighbours: Int = Field(15, ge=1, description="how many nearest neighbours a replacement is drawn from")
    seed: Int = 0


def job_problems(augment: AugmentConfig, alpha: float, alpha_searched: bool) -> list[tuple[str, str]]:
    """A job that augments must learn from its teacher: augmented rows have no other label."""
    if augment.copies and alpha == 0 and not alpha_searched:
        return [("task.augment.copies", f"{augment.copies} augmented copies need the teacher's logits (they have "
                                        "no label of their own), but distill.alpha is 0; set distill.alpha > 0 "
                                        "or task.augment.copies: 0")]
    return []


def neighbour_table(embeddings: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """[len(candidates), k]: each candidate token's k nearest other candidates by cosine similarity."""
    import torch

    e = torch.nn.functional.normalize(torch.as_tensor(np.asarray(embeddings)[candidates]).float(), dim=-1)
    k = min(k, len(candidates) - 1)
    out = []
    for start in range(0, len(e), 1024):  # a block of rows at a time: the full matrix is vocabulary² floats
        sim = e[start:start + 1024] @ e.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        out.append(sim.topk(k, dim=-1).indices)
    return candidates[torch.cat(out).numpy()] if out else np.zeros((0, k), dtype=np.int64)


class Augmenter:
    """Makes augmented copies of texts with one teacher's tokenizer and word embeddings."""

    def __init__(self, cfg: AugmentConfig, tokenizer, embeddings: np.ndarray, training_texts: list):
        self.cfg = cfg
        self._normalize = tokenizer.backend_tokenizer.normalizer
        self._split = tokenizer.backend_tokenizer.pre_tokenizer
        self.mask_token = tokenizer.mask_token
        vocab = tokenizer.get_vocab()
        itos = {i: t for t, i in vocab.items()}
        special = set(tokenizer.all_special_ids)
        used = set()
        for side in _sides(training_texts):
            for ids in tokenizer(side, add_special_tokens=False)["input_ids"]:
                used.update(ids)
        # whole words only: a "##" piece or a special token is not a word to swap in or out
        candidates = np.array(sorted(i for i in used if i not in special and not itos[i].startswith("##")
                                     and any(c.isalpha() for c in itos[i])), dtype=np.int64)
        self.neighbours: dict[str, list[str]] = {}
        if len(candidates) > 1:
            table = neighbour_table(embeddings, candidates, cfg.neighbours)
            self.neighbours = {itos[int(c)]: [itos[int(n)] for n in row] for c, row in zip(candidates, table)}

    def text(self, text: str, rng: random.Random) -> str:
        """One augmented copy of ``text`` (normalised the tokenizer's way, words joined by spaces)."""
        if self._normalize is not None:
            text = self._normalize.normalize_str(text)
        words = [w for w, _ in self._split.pre_tokenize_str(text)] if self._split is not None else text.split()
        out = []
        for w in words:
            near = self.neighbours.get(w)
            if near and rng.random() < self.cfg.replace_prob:
                out.append(near[rng.randrange(len(near))])
            elif rng.random() < self.cfg.mask_prob:
                out.append(self.mask_token)
            else:
                out.append(w)
        return " ".join(out)

    def rows(self, texts: list) -> list:
        """``copies`` augmented copies of every row: copy c of row i is item ``c * len(texts) + i``."""
        out = []
        for c in range(self.cfg.copies):
            for i, t in enumerate(texts):
                # a seed of its own per (seed, copy, row): a row's copies do not depend on the other rows
                rng = random.Random((self.cfg.seed * 1_000_003 + c) * 1_000_000_007 + i)
                out.append(tuple(self.text(s, rng) for s in t) if isinstance(t, tuple) else self.text(t, rng))
        return out


def _sides(texts: list) -> list[list[str]]:
    if texts and isinstance(texts[0], tuple):
        return [[t[0] for t in texts], [t[1] for t in texts]]
    return [list(texts)]
