"""Speed options of a backbone: `backbone.compile` and `backbone.channels_last`.

compile: torch.compile of the backbone's feature path, in place. The objectives call the
backbone's pieces (patch embedding, blocks, norm) rather than one `forward`, so what is compiled is
the expensive part they all go through: a ViT's block stack (`run_blocks`), a CNN's
`forward_features`. Shapes are static (`dynamic=False`): each crop resolution gets its own graph
once (2 for DINO's global and local crops, 1 more for the teacher's no-grad pass), then every step
reuses them, so there is no recompilation per step. The module's parameters and state-dict keys
do not change, so checkpoints and exports are the same with and without it.

channels_last: NHWC memory format for convolutional backbones, their weights and their inputs
(faster convolutions on tensor-core GPUs). `null` (the default) turns it on for CNNs when CUDA is available.
"""

from __future__ import annotations

from typing import Any

import torch

from ssl.backbones.base import Backbone


def wants_channels_last(choice: Any, backbone: Backbone) -> bool:
    """`backbone.channels_last`: true | false | null (CNNs on CUDA)."""
    if choice is not None and not isinstance(choice, bool):
        raise ValueError(f"backbone.channels_last={choice!r}; valid: true, false, null (on CUDA)")
    if getattr(backbone, "is_vit", False):
        return False
    return torch.cuda.is_available() if choice is None else choice


def use_channels_last(backbone: Backbone) -> None:
    """Store the CNN's weights NHWC and make it convert its inputs (see ConvNetBackbone)."""
    backbone.model.to(memory_format=torch.channels_last)
    backbone.channels_last = True


def compile_backbone(backbone: Backbone, mode: str | None = None) -> None:
    """Compile the feature path in place (ViT: `run_blocks`; CNN: the timm model's `forward_features`)."""
    if getattr(backbone, "is_vit", False):
        backbone.run_blocks = torch.compile(backbone.run_blocks, dynamic=False, mode=mode)
    else:
        backbone.model.forward_features = torch.compile(
            backbone.model.forward_features, dynamic=False, mode=mode
        )
