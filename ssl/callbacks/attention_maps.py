"""Self-attention maps during training: PNG in the run directory, image in wandb.

Every N epochs (and after the last), on rank 0, a fixed set of clean training images goes through
the backbone evaluations use (the EMA teacher's when there is one, as DINO visualises it): row 1
the images, then one row per head of the last block's CLS attention over the patches, then the
heads' thresholded masks. The same images every time, so epochs are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import Dataset

from ssl.data.views import eval_transform
from ssl.visualize.attention import (
    cls_attention_maps,
    denormalize,
    has_cls_attention,
    overlay,
    threshold_masks,
)


def visualised_backbone(module: Any) -> nn.Module:
    """The teacher's backbone when the module has a teacher, else the student's."""
    if hasattr(module, "eval_backbone"):
        return module.eval_backbone("teacher")
    return module.backbone


class AttentionMaps(pl.Callback):
    def __init__(
        self,
        dataset: Dataset,
        dataset_cfg: Any,
        out_dir: str | Path,
        every_n_epochs: int = 1,
        num_images: int = 4,
        keep: float = 0.6,
    ) -> None:
        self.dataset = dataset
        self.dataset_cfg = dataset_cfg
        self.out_dir = Path(out_dir)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.num_images = int(num_images)
        self.keep = float(keep)
        self.mean = [float(m) for m in dataset_cfg.mean]
        self.std = [float(s) for s in dataset_cfg.std]
        self.written: list[Path] = []

    def images(self) -> torch.Tensor:
        """Evenly spaced clean images of the pretraining set (the same ones every time)."""
        transform = eval_transform(self.dataset_cfg.image_size, self.mean, self.std)
        n = min(self.num_images, len(self.dataset))
        step = len(self.dataset) / max(n, 1)
        return torch.stack([transform(self.dataset[int(i * step)][0]) for i in range(n)])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        last_epoch = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if (epoch % self.every_n_epochs and not last_epoch) or not trainer.is_global_zero:
            return
        self.write(module, trainer.current_epoch, trainer.global_step, trainer.logger)

    def write(self, module: Any, epoch: int, step: int, logger: Any = None) -> Path | None:
        """Save `<out_dir>/epochNNN.png` and log it to wandb; None when the backbone has no CLS attention."""
        backbone = visualised_backbone(module)
        if not has_cls_attention(backbone):
            return None
        images = self.images().to(next(backbone.parameters()).device)
        was_training = module.training
        module.eval()
        try:
            maps = cls_attention_maps(backbone, images).cpu()
        finally:
            module.train(was_training)
        picture = overlay(denormalize(images, self.mean, self.std), maps, threshold_masks(maps, self.keep))
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"epoch{epoch:03d}.png"
        picture.save(path)
        if isinstance(logger, pl.loggers.WandbLogger):
            caption = [f"rows: image / {maps.shape[1]} heads' CLS attention / masks holding {self.keep:.0%}"]
            logger.log_image("attention_maps", [picture], step=step, caption=caption)
        self.written.append(path)
        return path
