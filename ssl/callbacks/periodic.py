"""What the monitoring callbacks share: acting every N epochs (and after the last one), and
image grids of a fixed set of clean training images saved as PNG and logged to wandb."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssl.data.datamodule import evenly_spaced_images


def is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """True at the end of every `every_n_epochs`-th epoch and of the last one."""
    epoch = trainer.current_epoch + 1
    last_epoch = trainer.max_epochs is not None and epoch >= trainer.max_epochs
    return epoch % max(1, int(every_n_epochs)) == 0 or last_epoch


class ImageGridCallback(pl.Callback):
    """Every N epochs, on rank 0, `write` pictures of the same evenly spaced clean images.

    Subclasses implement `write(module, epoch, step, logger)` and call `save` for each picture.
    """

    def __init__(
        self,
        dataset: Dataset,
        dataset_cfg: Any,
        out_dir: str | Path,
        every_n_epochs: int = 1,
        num_images: int = 8,
    ) -> None:
        self.dataset = dataset
        self.dataset_cfg = dataset_cfg
        self.out_dir = Path(out_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_images = int(num_images)
        self.mean = [float(m) for m in dataset_cfg.mean]
        self.std = [float(s) for s in dataset_cfg.std]
        self.written: list[Path] = []

    def images(self) -> torch.Tensor:
        """Evenly spaced clean images of the pretraining set (the same ones every time)."""
        return evenly_spaced_images(self.dataset, self.dataset_cfg, self.num_images)[0]

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if is_due(trainer, self.every_n_epochs) and trainer.is_global_zero:
            self.write(module, trainer.current_epoch, trainer.global_step, trainer.logger)

    def write(self, module: Any, epoch: int, step: int, logger: Any = None) -> Any:
        raise NotImplementedError

    def save(
        self, picture: Image.Image, filename: str, key: str, caption: str, step: int, logger: Any
    ) -> Path:
        """`<out_dir>/<filename>` as PNG, and the image in wandb under `key` when the logger is wandb."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / filename
        picture.save(path)
        if isinstance(logger, pl.loggers.WandbLogger):
            logger.log_image(key, [picture], step=step, caption=[caption])
        self.written.append(path)
        return path
