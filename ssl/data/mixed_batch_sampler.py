"""Batches with a fixed number of labelled images: `data.labelled_per_batch` of every batch.

With 1% of the images labelled, a plain shuffle gives a batch of 64 less than one labelled image
on average, and a different number every step: the supervised loss would be noisy and mostly
absent. This sampler composes every batch of L labelled images (cycling through the labelled
pool, reshuffled at each pass) and B - L of the others, so the supervised loss always sees L
images and the unlabelled loss sees all B. The epoch is one pass over the unlabelled pool (over
the labelled pool when L = B). Each pool is shuffled and sharded across ranks like
ResumableSampler, from (seed, epoch) only, and every sample's augmentation seed is the same
function of (seed, epoch, index), so a killed run resumes on the same batches.
"""

from __future__ import annotations

import numpy as np
import torch

from ssl.data.resumable_sampler import ResumableSampler
from ssl.errors import IncompatibleConfigError


def rank_shard(pool: np.ndarray, generator: torch.Generator, rank: int, world: int) -> np.ndarray:
    """A seeded permutation of `pool`, trimmed to a multiple of `world`, this rank's every world-th."""
    order = pool[torch.randperm(len(pool), generator=generator).numpy()]
    usable = len(order) - len(order) % world
    return order[:usable][rank::world]


class MixedBatchSampler(ResumableSampler):
    """Yields `(index, seed)` so that each consecutive `batch_size` samples hold `labelled_per_batch`
    labelled ones first, then the rest; use with DataLoader(batch_size=batch_size, drop_last=True)."""

    def __init__(
        self,
        labelled: np.ndarray,
        num_samples: int,
        batch_size: int,
        labelled_per_batch: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(num_samples, num_replicas, rank, seed)
        self.batch_size, self.per_batch = int(batch_size), int(labelled_per_batch)
        mask = np.zeros(num_samples, dtype=bool)
        mask[np.asarray(labelled, dtype=np.int64)] = True
        self.labelled, self.unlabelled = np.flatnonzero(mask), np.flatnonzero(~mask)
        if not 1 <= self.per_batch <= self.batch_size:
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={labelled_per_batch} with data.batch_size={batch_size}: "
                f"use 1..{batch_size} (null: no control, labelled images fall where the shuffle puts them)"
            )
        if len(self.labelled) < num_replicas:
            raise IncompatibleConfigError(
                f"data.labelled_per_batch needs labelled images on every one of the {num_replicas} ranks; "
                f"the split holds {len(self.labelled)}: label more (dataset.labelled_fraction / _per_class)"
            )
        others = self.batch_size - self.per_batch
        if others and len(self.unlabelled) < num_replicas * others:
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={labelled_per_batch}: only {len(self.unlabelled)} unlabelled "
                f"images, not one batch of {others} per rank; set data.labelled_per_batch="
                f"{self.batch_size} to train on the labelled images alone"
            )
        if not self.batches_per_epoch():
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={labelled_per_batch} = data.batch_size: the {len(self.labelled)} "
                f"labelled images do not fill one batch per rank ({num_replicas}); lower "
                "data.labelled_per_batch or data.batch_size"
            )

    def batches_per_epoch(self) -> int:
        others = self.batch_size - self.per_batch
        if others == 0:
            return len(self.labelled) // self.num_replicas // self.batch_size
        return len(self.unlabelled) // self.num_replicas // others

    def indices(self, epoch: int) -> list[int]:  # type: ignore[override]
        """This rank's epoch: batch j = labelled stream [jL, (j+1)L) + unlabelled [j(B-L), (j+1)(B-L))."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        others = self.batch_size - self.per_batch
        n_batches = self.batches_per_epoch()
        unlabelled = rank_shard(self.unlabelled, generator, self.rank, self.num_replicas) if others else None
        needed = n_batches * self.per_batch
        stream: list[np.ndarray] = []
        while sum(len(s) for s in stream) < needed:  # labelled pool reshuffled at every pass
            stream.append(rank_shard(self.labelled, generator, self.rank, self.num_replicas))
        labelled = np.concatenate(stream)[:needed] if stream else np.empty(0, dtype=np.int64)
        order: list[int] = []
        for j in range(n_batches):
            order += labelled[j * self.per_batch:(j + 1) * self.per_batch].tolist()
            if others:
                order += unlabelled[j * others:(j + 1) * others].tolist()
        return order

    def __len__(self) -> int:
        return self.batches_per_epoch() * self.batch_size
