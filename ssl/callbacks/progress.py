"""A progress bar that never makes the training step wait for the GPU.

Lightning turns every metric logged with `prog_bar=True` into a Python number after every batch
(`.item()`, a host-device sync), whatever the bar's refresh rate. So the training module logs none
and hands the bar host values instead (`SSLModule.progress_metrics`: the loss and lr it reads
anyway every `trainer.log_every_n_steps` steps); the bar refreshes at that rate too.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar


class LazyProgressBar(TQDMProgressBar):
    """TQDM bar refreshed every `refresh_rate` batches, showing the module's `progress_metrics`."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.update(getattr(pl_module, "progress_metrics", {}))
        return metrics
