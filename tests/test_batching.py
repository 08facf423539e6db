import numpy as np
import pytest

from workers.batching import batches_per_epoch, epoch_batches, rank_share


def _lengths(n=1000, seed=0):
    # SST-2-like: mostly short rows, a long tail
    return np.clip(np.random.default_rng(seed).lognormal(2.4, 0.6, n).astype(int), 3, 64)


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("n,batch,world", [(1000, 32, 1), (1000, 32, 2), (997, 16, 3), (5, 8, 1), (2, 4, 3)])
def test_every_row_exactly_once_per_epoch(group, n, batch, world):
    lengths = _lengths(n)
    for epoch in range(3):
        batches = epoch_batches(lengths, batch, world, seed=1, epoch=epoch, group_by_length=group)
        assert len(batches) == batches_per_epoch(max(n, world), batch, world)
        rows = np.concatenate(batches)
        if n >= world:
            assert sorted(rows) == list(range(n))
        else:  # fewer rows than ranks: rows repeat so that no rank is idle
            assert set(rows) == set(range(n))
        assert all(world <= len(b) <= batch * world for b in batches)


def test_grouping_pads_less_than_random_batches():
    lengths = _lengths(4000)
    width = {}
    for group in (True, False):
        batches = epoch_batches(lengths, 32, 1, seed=0, epoch=0, group_by_length=group)
        # padded tokens per real token when each batch is padded to its longest row
        width[group] = sum(len(b) * lengths[b].max() for b in batches) / lengths.sum()
    assert width[True] < 1.05 < 1.5 < width[False]
    # each batch is one bucket: batches' length ranges meet at most at their ends
    ranges = sorted((lengths[b].min(), lengths[b].max()) for b in epoch_batches(lengths, 32, 1, seed=0, epoch=0))
    assert all(hi <= next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:]))


def test_order_is_deterministic_per_seed_and_differs_by_seed_and_epoch():
    lengths = _lengths()

    def order(seed, epoch, group=True):
        return np.concatenate(epoch_batches(lengths, 32, 2, seed=seed, epoch=epoch, group_by_length=group))

    assert np.array_equal(order(3, 0), order(3, 0))
    assert not np.array_equal(order(3, 0), order(4, 0))
    assert not np.array_equal(order(3, 0), order(3, 1))
    assert not np.array_equal(order(3, 0, False), order(4, 0, False))
    # the batches' order is shuffled: lengths do not rise through the epoch
    firsts = [lengths[b].mean() for b in epoch_batches(lengths, 32, 1, seed=3, epoch=0)]
    assert not np.all(np.diff(firsts) >= 0)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_take_disjoint_shares_that_cover_each_batch(world):
    lengths = _lengths(1003)
    for batch in epoch_batches(lengths, 16, world, seed=0, epoch=0):
        shares = [rank_share(batch, r, world) for r in range(world)]
        assert all(len(s) >= 1 for s in shares)
        joined = np.concatenate(shares)
        assert len(set(joined)) == len(joined) and sorted(joined) == sorted(batch)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_training_loop_pads_each_batch_only_to_its_own_rows(tiny_bert):
    from common.trial_config import DistillConfig, TrainConfig
    from workers.data import Encoded
    from workers.distill import distill

    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 41, 96)
    ids = np.zeros((96, 40), dtype=np.int32)  # stored padded to the longest row of the whole split
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(5, 1000, n)
    data = Encoded(ids, np.zeros_like(ids, dtype=np.int8), lengths, (ids[:, 1] % 2).astype(np.int64))
    seen = []
    tiny_bert.register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(kw["input_ids"].shape)),
                                        with_kwargs=True)
    distill(tiny_bert, data, DistillConfig(alpha=0.0), TrainConfig(epochs=1, batch_size=8))
    assert len(seen) == 12 and sum(rows for rows, _ in seen) == 96
    padded = sum(rows * width for rows, width in seen)
    assert padded < 1.1 * lengths.sum()  # random batches of 8 would pad to about 1.5x
