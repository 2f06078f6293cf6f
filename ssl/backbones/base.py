"""The one feature API every backbone offers, so objectives never special-case an architecture."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BackboneFeatures:
    """What a backbone computes for a batch of images.

    global_vector: [B, D] image embedding (ViT: CLS token after the final norm; CNN: avg-pool).
    patch_tokens:  [B, L, D] per-location features after the final norm (CNN: flattened last map).
    grid:          (h, w) layout of `patch_tokens`.
    block_outputs: per-block outputs [B, L, D] without prefix tokens, before the final norm
                   (ViTs only, filled when asked for).
    """

    global_vector: torch.Tensor
    patch_tokens: torch.Tensor
    grid: tuple[int, int]
    block_outputs: list[torch.Tensor] = field(default_factory=list)


class Backbone(nn.Module):
    """Base class: subclasses wrap a timm model as `self.model` and fill `BackboneFeatures`."""

    model: nn.Module
    embed_dim: int
    is_vit: bool = False
    timm_name: str
    timm_kwargs: dict

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Global embedding [B, D]: the vector k-NN, linear probes and DINO heads consume."""
        return self.forward_features(images).global_vector

    def forward_features(
        self, images: torch.Tensor, return_blocks: bool = False
    ) -> BackboneFeatures:
        raise NotImplementedError

    @torch.no_grad()
    def output_grid(self, image_size: int) -> tuple[int, int]:
        """The (h, w) feature grid for a square image of this size: one dry run in eval mode.

        Architecture-agnostic (a small-image stem changes a ResNet's stride from 32 to 8).
        """
        was_training = self.training
        device = next(self.parameters()).device
        self.eval()
        try:
            grid = self.forward_features(torch.zeros(1, 3, image_size, image_size, device=device)).grid
        finally:
            self.train(was_training)
        return tuple(grid)

    def output_stride(self, probe_size: int = 256) -> int:
        """Pixels per feature-grid cell (ViT: the patch size; ResNet: 32, or 8 with the small stem).

        Measured at a probe size divisible by every usual stride, so that a grid which overhangs a
        small image (28 px at stride 8 gives 4 cells) does not distort it.
        """
        return max(1, round(probe_size / self.output_grid(probe_size)[0]))
