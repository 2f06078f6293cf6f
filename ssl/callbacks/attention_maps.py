"""Self-attention maps during training: PNG in the run directory, image in wandb.

Every N epochs (and after the last), on rank 0, a fixed set of clean training images goes through
the backbone evaluations use (the EMA teacher's when there is one, as DINO visualises it): row 1
the images, then one row per head of the last block's CLS attention over the patches, then the
heads' thresholded masks. The same images every time, so epochs are comparable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from ssl.callbacks.periodic import ImageGridCallback
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


class AttentionMaps(ImageGridCallback):
    def __init__(
        self,
        dataset: Dataset,
        dataset_cfg: Any,
        out_dir: str | Path,
        every_n_epochs: int = 1,
        num_images: int = 4,
        keep: float = 0.6,
    ) -> None:
        super().__init__(dataset, dataset_cfg, out_dir, every_n_epochs, num_images)
        self.keep = float(keep)

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
        caption = f"rows: image / {maps.shape[1]} heads' CLS attention / masks holding {self.keep:.0%}"
        return self.save(picture, f"epoch{epoch:03d}.png", "attention_maps", caption, step, logger)
