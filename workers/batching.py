"""Which rows go into which batch: one epoch's batches, in training order, for every data-parallel rank.

Length grouping sorts the rows by length (ties broken at random) and cuts the sorted order into batches, so a
batch holds rows of about one length and is padded to little more than its own longest row; the batches'
order is then shuffled. Random batching cuts a plain permutation instead. Either way every row is used exactly
once per epoch, the order depends only on (seed, epoch), and each rank takes a disjoint share of every batch.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["batches_per_epoch", "epoch_batches", "rank_share"]


def batches_per_epoch(n_rows: int, batch_size: int, world: int) -> int:
    """Global batches (``batch_size`` rows per rank) that cover ``n_rows`` once; the last may be smaller."""
    return max(1, math.ceil(n_rows / (batch_size * world)))


def epoch_batches(lengths: np.ndarray, batch_size: int, world: int, seed: int, epoch: int, *,
                  group_by_length: bool = True) -> list[np.ndarray]:
    """Epoch ``epoch``'s global batches: arrays of row indices, each at most ``batch_size * world`` long.

    Batches differ in size by at most one row (the remainder is spread, not dropped), and every batch has at
    least ``world`` rows so that no rank is ever idle; a data set smaller than that repeats rows."""
    n = len(lengths)
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if n < world:
        order = np.resize(order, world)
    if group_by_length:
        order = order[np.argsort(np.asarray(lengths)[order], kind="stable")]
    batches = np.array_split(order, batches_per_epoch(len(order), batch_size, world))
    if group_by_length:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def rank_share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """Rank ``rank``'s rows of a global batch: every world-th row, so ranks get about equal lengths."""
    return batch[rank::world]
