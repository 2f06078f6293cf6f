"""data2vec 2.0's light convolutional decoder (fairseq `Decoder2d`, images).

The encoder saw only the visible tokens; the decoder gets them back on the full token grid, with
Gaussian noise N(0, std^2) at the masked positions (no learned mask token), and fills every
position in with `layers` x [grouped Conv2d (k x k, "same") -> LayerNorm over channels without
affine -> GELU], a residual around each layer whose channels match, then one Linear back to the
encoder width. Official image config: 768 wide, 6 layers, kernel 3, 16 groups (ViT-L: 1024, 3
layers, kernel 5). A few convolutions instead of MAE's transformer decoder is what keeps the
decoder cheap next to an encoder that runs on 20% of the tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl.data.masking import gather_tokens


def decoder_input(
    visible: torch.Tensor, ids_restore: torch.Tensor, noise_std: float
) -> torch.Tensor:
    """[B, K, D] visible latents (prefix tokens removed) -> [B, L, D] on the full grid in raster
    order, N(0, noise_std^2) at the L - K masked positions (fairseq `decoder_input`)."""
    b, k, d = visible.shape
    noise = visible.new_empty(b, ids_restore.shape[1] - k, d).normal_(0.0, noise_std)
    return gather_tokens(torch.cat([visible, noise], dim=1), ids_restore)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of [B, C, H, W], without affine (eps 1e-5, fairseq's default)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2]).permute(0, 3, 1, 2)


class ConvDecoder2d(nn.Module):
    """Full-grid tokens [B, L, D] -> predictions [B, L, D] of the teacher's targets.

    Parameters keep PyTorch's default init (fairseq's BERT init touches only Linear layers
    of the encoder, and `Decoder2d.reset_parameters` resets its projection to the default).
    """

    def __init__(self, embed_dim: int, decoder_dim: int, layers: int, kernel: int, groups: int) -> None:
        super().__init__()
        if embed_dim % groups or decoder_dim % groups:
            raise ValueError(
                f"decoder groups {groups} must divide the encoder width {embed_dim} and the decoder "
                f"width {decoder_dim}"
            )
        self.kernel = int(kernel)
        self.blocks = nn.ModuleList()
        for i in range(layers):
            self.blocks.append(nn.Sequential(
                nn.Conv2d(embed_dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2,
                          groups=groups),
                ChannelLayerNorm(),
                nn.GELU(),
            ))
        self.proj = nn.Linear(decoder_dim, embed_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, length, channels = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, channels, grid[0], grid[1])
        for block in self.blocks:
            residual = x
            y = block[0](x)
            if self.kernel % 2 == 0:  # fairseq's SamePad2d: an even kernel's extra row and column
                y = y[..., :-1, :-1]
            y = block[2](block[1](y))
            x = y + residual if y.shape[1] == residual.shape[1] else y
        return self.proj(x.reshape(b, x.shape[1], length).transpose(1, 2))
