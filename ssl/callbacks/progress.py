"""A progress bar that never makes the training step wait for the GPU.

Lightning turns every metric logged with `prog_bar=True` into a Python number after every batch
(`.item()`, a host-device sync), whatever the bar's refresh rate. So the training module logs none
and hands the bar host values instead (`SSLModule.progress_metrics`: the loss and lr it reads
anyway every `trainer.log_every_n_steps` steps); the bar refreshes at that rate too. With a
`RunClock` it also shows the run's step out of its total and the time left for the whole run.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import TQDMProgressBar

from ssl.callbacks.run_clock import RunClock


class LazyProgressBar(TQDMProgressBar):
    """TQDM bar refreshed every `refresh_rate` batches, showing the module's `progress_metrics`."""

    def __init__(self, refresh_rate: int = 1, clock: RunClock | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate)
        self.clock = clock

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.update(getattr(pl_module, "progress_metrics", {}))
        if self.clock is not None:
            metrics.update(self.clock.postfix(trainer.global_step))
        return metrics
