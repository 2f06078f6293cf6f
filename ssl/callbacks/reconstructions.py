"""Reconstruction grids of masked-modeling objectives: PNG in the run directory, images in wandb.

Every N epochs, on rank 0, a fixed set of clean training images goes through each objective
that can reconstruct (MAE, MFM): row 1 the original, row 2 the masked or filtered input, row 3
the reconstruction. Masks come from a fixed seed, so grids of different epochs are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid

from ssl.callbacks.periodic import ImageGridCallback
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


class ReconstructionGrid(ImageGridCallback):
    """Original / corrupted / reconstructed rows for every objective that can reconstruct."""

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
                picture = reconstruction_grid(rec, torch.tensor(self.mean), torch.tensor(self.std))
                caption = "rows: original / masked input / reconstruction"
                paths.append(self.save(picture, f"{name}_epoch{epoch:03d}.png", f"reconstructions/{name}",
                                       caption, step, logger))
        finally:
            module.train(was_training)
        return paths
