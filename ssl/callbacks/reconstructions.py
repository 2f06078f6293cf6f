"""Reconstruction grids of masked-modeling objectives: PNG in the run directory, images in wandb.

Every N epochs, on rank 0, a fixed set of clean training images goes through each objective
that can reconstruct (MAE, MFM): row 1 the original, row 2 the masked or filtered input, row 3
the reconstruction. Masks come from a fixed seed, so grids of different epochs are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.utils import make_grid

from ssl.data.views import eval_transform
from ssl.objectives.base import Objective, Reconstruction

MIN_DISPLAY_SIZE = 96  # small images (28 px) are enlarged, nearest-neighbour, for viewing


def can_reconstruct(objective: Objective) -> bool:
    return type(objective).reconstruct is not Objective.reconstruct


def reconstruction_grid(rec: Reconstruction, mean: torch.Tensor, std: torch.Tensor) -> Image.Image:
    """Three rows (original / corrupted / reconstruction) of de-normalised images, clamped to [0, 1]."""
    rows = torch.cat([rec.original, rec.corrupted, rec.reconstruction]).float().cpu()
    pixels = (rows * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).clamp(0, 1)
    size = pixels.shape[-1]
    if size < MIN_DISPLAY_SIZE:
        scale = -(-MIN_DISPLAY_SIZE // size)
        pixels = torch.nn.functional.interpolate(pixels, scale_factor=scale, mode="nearest")
    grid = make_grid(pixels, nrow=rec.original.shape[0], padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


class ReconstructionGrid(pl.Callback):
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
        self.mean = torch.tensor([float(m) for m in dataset_cfg.mean])
        self.std = torch.tensor([float(s) for s in dataset_cfg.std])
        self.written: list[Path] = []

    def images(self) -> torch.Tensor:
        """Evenly spaced clean images of the pretraining set (the same ones every time)."""
        transform = eval_transform(self.dataset_cfg.image_size, self.mean.tolist(), self.std.tolist())
        n = min(self.num_images, len(self.dataset))
        step = len(self.dataset) / max(n, 1)
        return torch.stack([transform(self.dataset[int(i * step)][0]) for i in range(n)])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last_epoch = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if (epoch % self.every_n_epochs and not last_epoch) or not trainer.is_global_zero:
            return
        self.write(module, trainer.current_epoch, trainer.global_step, trainer.logger)

    def write(self, module: Any, epoch: int, step: int, logger: Any = None) -> list[Path]:
        """Save one grid per reconstructing objective; returns the PNG paths."""
        objectives = {n: o for n, o in module.objectives.items() if can_reconstruct(o)}
        if not objectives:
            return []
        images = self.images().to(module.device)
        was_training = module.training
        module.eval()
        paths = []
        try:
            for name, objective in objectives.items():
                rec = objective.reconstruct(images, module.backbone)
                picture = reconstruction_grid(rec, self.mean, self.std)
                self.out_dir.mkdir(parents=True, exist_ok=True)
                path = self.out_dir / f"{name}_epoch{epoch:03d}.png"
                picture.save(path)
                paths.append(path)
                if isinstance(logger, pl.loggers.WandbLogger):
                    caption = ["rows: original / masked input / reconstruction"]
                    logger.log_image(f"reconstructions/{name}", [picture], step=step, caption=caption)
        finally:
            module.train(was_training)
        self.written.extend(paths)
        return paths
