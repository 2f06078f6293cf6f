"""A shuffling sampler that can resume inside an epoch and seeds every sample's augmentations.

Lightning restarts a plain shuffled DataLoader from a fresh permutation after a mid-epoch resume,
so the resumed run sees other images than an uninterrupted one. This sampler draws epoch `e`'s
order from a generator seeded by (seed, e) alone, can start `start` samples into it, and yields
`(index, sample_seed)` pairs: the dataset seeds the sample's augmentations (and the collate step
its masks) from `sample_seed`, a function of (seed, epoch, index) only. Which images a step sees
and how they are augmented then depend neither on the worker count nor on where a run was killed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item `index` in `epoch` (63 bits, well mixed)."""
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """DistributedSampler's shuffle-and-shard (so Lightning keeps it under DDP), resumable.

    `resume_at(epoch, start)` makes the next pass over `epoch` skip its first `start` samples of
    this rank's shard; any other epoch, or any later pass, starts at 0.
    """

    def __init__(
        self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0, drop_last: bool = False
    ) -> None:
        self.length = int(num_samples)
        super().__init__(
            range(self.length), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
            drop_last=drop_last,
        )
        self.resume_epoch: int | None = None
        self.resume_start = 0

    def resume_at(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.resume_epoch, self.resume_start = int(epoch), int(start)

    def indices(self, epoch: int) -> list[int]:
        """This rank's shard of epoch `epoch`'s permutation (padded or trimmed as DistributedSampler)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.length, generator=generator).tolist()
        if self.drop_last:
            order = order[: self.total_size]
        else:
            pad = self.total_size - len(order)
            order += (order * math.ceil(pad / max(len(order), 1)))[:pad]
        return order[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        epoch = self.epoch
        start = self.resume_start if epoch == self.resume_epoch else 0
        self.resume_epoch, self.resume_start = None, 0  # one resumed pass only
        chosen = self.indices(epoch)[start:]
        return ((i, sample_seed(self.seed, epoch, i)) for i in chosen)  # seeds drawn lazily

    def __len__(self) -> int:
        return self.num_samples
