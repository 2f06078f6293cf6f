"""MFM's prediction head: a 1x1 convolution to stride^2 * 3 channels, then PixelShuffle(stride)."""

from __future__ import annotations

import torch
from torch import nn


class PixelShuffleHead(nn.Module):
    """Feature map [B, D, h, w] -> image [B, 3, h*s, w*s] (MFM's depth-0 "decoder").

    Channel order after the shuffle is (c, i, j), as torch's PixelShuffle (MAE's patches are
    (i, j, c)); this only matters when converting weights.
    """

    def __init__(self, in_dim: int, stride: int, out_chans: int = 3) -> None:
        super().__init__()
        self.stride = stride
        self.proj = nn.Conv2d(in_dim, stride * stride * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(stride)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.proj(feature_map))
