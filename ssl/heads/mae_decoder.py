"""MAE's lightweight decoder: visible latents + mask tokens -> per-patch pixels."""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl.backbones.sincos import sincos_2d
from ssl.data.masking import gather_tokens


def xavier_init(module: nn.Module) -> None:
    """MAE's `_init_weights`: xavier-uniform Linear with zero bias, LayerNorm (1, 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class MAEDecoder(nn.Module):
    """Linear embed -> append mask tokens -> unshuffle -> fixed 2-D sin-cos -> blocks -> LN -> Linear.

    The prefix (CLS / register) tokens of the encoder pass through the blocks with a zero position
    embedding, as MAE's all-zero CLS slot; the prediction drops them.
    """

    def __init__(
        self,
        embed_dim: int,
        patch_size: int,
        decoder_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(decoder_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(decoder_dim)
        self.pred = nn.Linear(decoder_dim, patch_size * patch_size * in_chans)
        self.apply(xavier_init)
        nn.init.normal_(self.mask_token, std=0.02)
        self._pos_cache: dict[tuple, torch.Tensor] = {}

    def position_embedding(self, grid: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """Fixed [1, h*w, D] sin-cos table, cached per grid / device / dtype (never trained)."""
        key = (tuple(grid), like.device, like.dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = sincos_2d(self.decoder_dim, grid).to(like).unsqueeze(0)
        return self._pos_cache[key]

    def forward(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid: tuple[int, int], num_prefix: int
    ) -> torch.Tensor:
        """latent [B, prefix + keep, D] -> predicted pixels [B, L, p*p*C] for every patch."""
        x = self.embed(latent)
        prefix, visible = x[:, :num_prefix], x[:, num_prefix:]
        b, keep, d = visible.shape
        num_tokens = ids_restore.shape[1]
        filler = self.mask_token.to(visible.dtype).expand(b, num_tokens - keep, d)
        tokens = gather_tokens(torch.cat([visible, filler], dim=1), ids_restore)
        tokens = tokens + self.position_embedding(grid, tokens)
        x = torch.cat([prefix, tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, num_prefix:]
