"""The data module's side of a shard stream: its loader, the readers' positions, their checkpoint.

Kept apart from `datamodule.py`, which only forwards to it when the pretraining set is a shard
source (`is_stream_source`). Positions come from the batches the training step actually took
(`observe`, called from `on_after_batch_transfer`), not from batches the loader fetched ahead.
Under DDP every rank's positions go into the checkpoint (gathered when Lightning saves, which
all ranks do together).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from ssl.data.shard_stream import (
    STREAM_STATE,
    ShardSource,
    ShardStream,
    StreamCollate,
    StreamLoader,
    StreamPlan,
    resume_states,
)
from ssl.errors import IncompatibleConfigError

# Lightning warns that an IterableDataset's length may be wrong with several workers; the readers
# split the shards themselves and every rank yields exactly `len` batches, so it is not.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


class StreamFeed:
    """Builds the StreamLoader of a rank and keeps what its checkpoint needs to resume it."""

    def __init__(self, source: ShardSource, dataset_cfg: Any, transform: Callable, collate: Callable,
                 batch_size: int, num_workers: int, seed: int, prefetch_factor: int = 2) -> None:
        self.source, self.transform, self.collate = source, transform, collate
        self.batch_size, self.num_workers, self.seed = int(batch_size), int(num_workers), int(seed)
        self.prefetch_factor = int(prefetch_factor)
        self.buffer_size = int(dataset_cfg.shuffle_buffer)
        if self.buffer_size < 0:
            raise IncompatibleConfigError(f"dataset.shuffle_buffer={self.buffer_size}: must be >= 0 (0: off)")
        self.shuffle_shards = bool(dataset_cfg.shuffle_shards)
        epoch_samples = dataset_cfg.get("epoch_samples")
        self.epoch_samples = None if epoch_samples is None else int(epoch_samples)
        self.plan: StreamPlan | None = None
        self.rank = 0
        self.positions: dict[int, dict[str, Any]] = {}  # reader -> its state after its last trained batch
        self.saved: dict[str, Any] | None = None  # the checkpoint's stream entry, until its epoch starts
        self.resume_at: tuple[int, int] | None = None  # (epoch, batches done) of `saved`

    def loader(self, world: int, rank: int, current_epoch: Callable[[], int]) -> StreamLoader:
        self.rank = rank
        self.plan = StreamPlan(self.source.sizes, self.source.num_shards, world, self.num_workers,
                               self.batch_size, self.seed, self.shuffle_shards, self.epoch_samples)
        if rank == 0:
            print(f"webdataset stream: {self.plan.describe()}", file=sys.stderr, flush=True)
        stream = ShardStream(self.source, self.plan, rank, self.transform, self.buffer_size, self.seed)

        def before_pass(stream: ShardStream) -> None:
            epoch = int(current_epoch())
            stream.epoch, stream.batches_done, stream.resume = epoch, 0, {}
            if self.resume_at is not None and self.resume_at[0] == epoch and self.saved is not None:
                stream.batches_done = self.resume_at[1]
                stream.resume = resume_states(self.saved, self.plan, rank, epoch, stream.batches_done)
            self.saved, self.resume_at = None, None  # one resumed pass only
            self.positions = dict(stream.resume)

        return StreamLoader(
            stream, before_pass, num_workers=self.num_workers, collate_fn=StreamCollate(self.collate),
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
        )

    def observe(self, batch: Any) -> None:
        """Note the reader position a batch about to be trained on carries (and drop it from the batch)."""
        if isinstance(batch, dict) and STREAM_STATE in batch:
            entry = batch.pop(STREAM_STATE)
            self.positions[int(entry["reader"])] = entry["state"]

    def state(self) -> dict[str, Any]:
        """Every rank's reader positions and the split they belong to (a collective under DDP)."""
        mine = {str(k): v for k, v in self.positions.items()}
        readers = [mine]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            readers = [None] * dist.get_world_size()
            dist.all_gather_object(readers, mine)
        plan = self.plan
        assert plan is not None
        return {"world": plan.world, "workers": plan.workers, "batch_size": plan.batch_size,
                "num_shards": plan.num_shards, "readers": readers}

    def load(self, saved: dict[str, Any], epoch: int, batches_done: int) -> None:
        self.saved, self.resume_at = saved, (int(epoch), int(batches_done))
