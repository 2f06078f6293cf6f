"""Adapter for convolutional (and any other non-ViT) timm models."""

from __future__ import annotations

import torch
from torch import nn

from ssl.backbones.base import Backbone, BackboneFeatures


def replace_stem_for_small_images(model: nn.Module) -> bool:
    """Swap a ResNet-style 7x7/2 stem + max-pool for a 3x3/1 conv (the CIFAR recipe).

    At 28-32 px the ImageNet stem shrinks the image 4x before the first block, which leaves a
    1x1 map at the last stage. Returns whether the model had such a stem.
    """
    conv = getattr(model, "conv1", None)
    if not isinstance(conv, nn.Conv2d) or not hasattr(model, "maxpool"):
        return False
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return True


class ConvNetBackbone(Backbone):
    """Any timm model with `forward_features` giving NCHW maps (or tokens) and `forward_head`."""

    def __init__(self, model: nn.Module, timm_name: str, timm_kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.embed_dim = model.num_features
        self.channels_last = False  # set by ssl.backbones.acceleration.use_channels_last

    def forward_features(
        self, images: torch.Tensor, return_blocks: bool = False
    ) -> BackboneFeatures:
        if self.channels_last:  # backbone.channels_last: NHWC weights want NHWC inputs
            images = images.contiguous(memory_format=torch.channels_last)
        feats = self.model.forward_features(images)
        global_vector = self.model.forward_head(feats, pre_logits=True)
        if feats.ndim == 4:
            b, d, h, w = feats.shape
            tokens = feats.flatten(2).transpose(1, 2)
        else:
            h, w = 1, feats.shape[1]
            tokens = feats
        return BackboneFeatures(global_vector, tokens, (h, w), [])
