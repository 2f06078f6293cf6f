"""Counts the unreadable images skipped in each training epoch and reports them at its end.

The DataLoader workers cannot update a counter in the main process, so each batch carries its
skipped files (`batch["unreadable"]`, see `ssl.data.datamodule.TransformedDataset`) and this
callback adds them up. Under DDP the counts are summed over the ranks (each rank reads its own
shard; the few indices DistributedSampler repeats to even out the shards may count twice); the
first example named is rank 0's. Logged as `train/skipped_images` every epoch (0 included).
"""

from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
import torch


class SkippedImages(pl.Callback):
    """Sums `batch["unreadable"]` over an epoch; logs and prints the total at the epoch's end."""

    def __init__(self) -> None:
        self.count = 0
        self.first: tuple[str, str] | None = None
        self.last_total = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.count, self.first = 0, None

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        unreadable = batch.get("unreadable", ()) if isinstance(batch, dict) else ()
        self.count += len(unreadable)
        if unreadable and self.first is None:
            self.first = tuple(unreadable[0])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        local = torch.tensor(float(self.count), device=module.device)
        total = int(trainer.strategy.reduce(local, reduce_op="sum").item())
        self.last_total = total
        module.log("train/skipped_images", float(total), on_step=False, on_epoch=True, rank_zero_only=True)
        if total and trainer.is_global_zero:
            print(f"warning: {self.message(total, trainer.current_epoch)}", file=sys.stderr, flush=True)

    def message(self, total: int, epoch: int) -> str:
        """The epoch's report, naming the first skipped file and why it could not be read."""
        plural = "image" if total == 1 else "images"
        first = f" (first: {self.first[0]}: {self.first[1]})" if self.first else ""
        return f"epoch {epoch}: skipped {total} unreadable {plural}{first}; they were not trained on"
