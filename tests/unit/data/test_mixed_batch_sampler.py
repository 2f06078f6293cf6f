"""Batches with a fixed labelled count: exact per batch, covering the pool, sharded, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from ssl.data.mixed_batch_sampler import MixedBatchSampler
from ssl.data.resumable_sampler import sample_seed
from ssl.errors import IncompatibleConfigError

N, B, L = 103, 8, 3
LABELLED = np.array([2, 9, 17, 40, 41, 77, 90])


def batches(sampler: MixedBatchSampler) -> list[list[int]]:
    order = [i for i, _ in sampler]
    assert len(order) == len(sampler)
    return [order[k:k + B] for k in range(0, len(order), B)]


def test_every_batch_holds_exactly_the_asked_labelled_count() -> None:
    sampler = MixedBatchSampler(LABELLED, N, B, L, seed=4)
    found = batches(sampler)
    assert len(found) == (N - len(LABELLED)) // (B - L) and len(found[0]) == B
    labelled = set(LABELLED.tolist())
    assert all(sum(i in labelled for i in batch) == L for batch in found)
    assert all(set(batch[:L]) <= labelled for batch in found)


def test_one_epoch_covers_the_unlabelled_pool_once_and_cycles_the_labelled() -> None:
    sampler = MixedBatchSampler(LABELLED, N, B, L, seed=4)
    order = [i for i, _ in sampler]
    unlabelled = [i for i in order if i not in set(LABELLED.tolist())]
    assert len(unlabelled) == len(set(unlabelled))  # no unlabelled image twice
    left_out = set(range(N)) - set(LABELLED.tolist()) - set(unlabelled)
    assert len(left_out) == (N - len(LABELLED)) % (B - L)  # only the incomplete last batch's
    labelled = [i for i in order if i in set(LABELLED.tolist())]
    assert set(labelled) == set(LABELLED.tolist())  # 57 slots cycle through all 7
    first_pass = labelled[:len(LABELLED)]
    assert sorted(first_pass) == sorted(LABELLED.tolist())  # each pass is a permutation


def test_epochs_reshuffle_and_seeds_follow_the_index() -> None:
    sampler = MixedBatchSampler(LABELLED, N, B, L, seed=4)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert [i for i, _ in epoch0] != [i for i, _ in epoch1]
    assert all(s == sample_seed(4, 1, i) for i, s in epoch1)


def test_rank_shards_are_disjoint_and_equally_long() -> None:
    world = 3
    shards = [[i for i, _ in MixedBatchSampler(LABELLED, N, B, L, world, rank, seed=2)]
              for rank in range(world)]
    assert len({len(s) for s in shards}) == 1 and len(shards[0]) % B == 0
    unlabelled = [{i for i in s if i not in set(LABELLED.tolist())} for s in shards]
    assert all(not (unlabelled[a] & unlabelled[b]) for a in range(world) for b in range(a + 1, world))
    # Within one pass over the labelled pool the ranks draw different images too.
    first = [s[:2] for s in shards]  # 7 labelled // 3 ranks: each rank's pass holds 2
    assert len({i for pair in first for i in pair}) == 6


def test_resume_at_continues_the_same_remaining_sequence() -> None:
    full = MixedBatchSampler(LABELLED, N, B, L, 2, 1, seed=5)
    full.set_epoch(3)
    expected = list(full)
    resumed = MixedBatchSampler(LABELLED, N, B, L, 2, 1, seed=5)  # a fresh process
    resumed.resume_at(3, 4 * B)
    assert list(resumed) == expected[4 * B:]
    assert list(resumed) == expected  # the next pass over epoch 3 starts at 0 again


def test_labelled_only_batches() -> None:
    labelled = np.arange(20)
    found = batches(MixedBatchSampler(labelled, N, B, B, seed=0))
    assert len(found) == 20 // B and all(max(batch) < 20 for batch in found)


@pytest.mark.parametrize("labelled,per_batch,world,message", [
    (LABELLED, 0, 1, "use 1..8"),
    (LABELLED, 9, 1, "use 1..8"),
    (np.array([1]), 2, 2, "on every one of the 2 ranks"),
    (np.arange(100), 3, 1, "only 3 unlabelled images"),
    (np.arange(5), B, 1, "do not fill one batch"),
])
def test_impossible_settings_say_what_to_change(labelled: np.ndarray, per_batch: int, world: int,
                                               message: str) -> None:
    with pytest.raises(IncompatibleConfigError, match=message):
        MixedBatchSampler(labelled, N, B, per_batch, world, 0)
