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
