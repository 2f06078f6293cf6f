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


class ConvDecoder2d(nn.Module):
    """Full-grid tokens [B, L, D] -> predictions [B, L, D] of the teacher's targets.

    Activations stay channels-last ([B, H, W, C], convolutions on channels_last views): the layer
    norm then runs over a contiguous last axis, and CPU grouped convolutions are ~30% faster.
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
        self.convs = nn.ModuleList(
            nn.Conv2d(embed_dim if i == 0 else decoder_dim, decoder_dim, kernel, padding=kernel // 2,
                      groups=groups)
            for i in range(layers)
        )
        self.proj = nn.Linear(decoder_dim, embed_dim)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, length, channels = tokens.shape
        x = tokens.reshape(b, grid[0], grid[1], channels)  # NHWC
        for conv in self.convs:
            y = conv(x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
            if self.kernel % 2 == 0:  # fairseq's SamePad2d: an even kernel's extra row and column
                y = y[..., :-1, :-1]
            y = y.permute(0, 2, 3, 1)  # back to NHWC: the LayerNorm over channels (no affine), GELU
            y = F.gelu(F.layer_norm(y, y.shape[-1:]))
            x = y + x if y.shape[-1] == x.shape[-1] else y
        return self.proj(x.reshape(b, length, x.shape[-1]))
