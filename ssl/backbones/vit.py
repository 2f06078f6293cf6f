"""Vision Transformer adapter over timm's `VisionTransformer`.

The token path is written out here (instead of calling timm's `forward`) for two reasons: crops
of any size get DINO's position-embedding interpolation (bicubic, `scale_factor=(n + 0.1) / N`,
no antialias, the CLS embedding kept), and later objectives can inject or drop tokens between
the patch embedding and the blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl.backbones.base import Backbone, BackboneFeatures


def interpolate_patch_pos_embed(
    patch_pos: torch.Tensor, grid: tuple[int, int], new_grid: tuple[int, int]
) -> torch.Tensor:
    """Resize [1, gh*gw, D] patch position embeddings to `new_grid` the way DINO does.

    DINO adds 0.1 to the target size before turning it into a scale factor, so that floating
    point rounding inside `interpolate` never yields one row/column too few.
    """
    if tuple(grid) == tuple(new_grid):
        return patch_pos
    gh, gw = grid
    h, w = new_grid
    dim = patch_pos.shape[-1]
    as_image = patch_pos.reshape(1, gh, gw, dim).permute(0, 3, 1, 2).float()
    resized = F.interpolate(
        as_image, scale_factor=((h + 0.1) / gh, (w + 0.1) / gw), mode="bicubic", align_corners=False
    )
    if resized.shape[-2:] != (h, w):
        raise RuntimeError(f"position-embedding interpolation gave {resized.shape[-2:]}, not {(h, w)}")
    return resized.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(patch_pos.dtype)


class ViTBackbone(Backbone):
    """timm ViT with the shared feature API; accepts crops of any size divisible by the patch."""

    is_vit = True

    def __init__(self, model: nn.Module, timm_name: str, timm_kwargs: dict) -> None:
        super().__init__()
        self.model = model
        self.timm_name = timm_name
        self.timm_kwargs = dict(timm_kwargs)
        self.embed_dim = model.embed_dim
        self.patch_size = model.patch_embed.patch_size[0]
        self.grid = tuple(model.patch_embed.grid_size)

    def output_stride(self, probe_size: int = 256) -> int:
        return self.patch_size

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def prefix_tokens(self, batch: int) -> torch.Tensor | None:
        """CLS (and register) tokens for a batch, or None for a model without them."""
        parts = [t for t in (self.model.cls_token, getattr(self.model, "reg_token", None)) if t is not None]
        if not parts:
            return None
        return torch.cat([t.expand(batch, -1, -1) for t in parts], dim=1)

    def embed_patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens [B, L, D] *before* any position embedding, and the token grid.

        data2vec / BEiT blend their mask token in here, before positions are added.
        """
        tokens = self.model.patch_embed(images)
        if tokens.ndim == 4:  # NHWC from timm's dynamic-size patch embedding
            b, h, w, d = tokens.shape
            return tokens.reshape(b, h * w, d), (h, w)
        return tokens, (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)

    def add_position(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Add the patch position embedding, interpolated to `grid` (no-op without one)."""
        pos = self.model.pos_embed
        if pos is None:
            return tokens
        n_prefix_pos = 0 if self.model.no_embed_class else self.model.num_prefix_tokens
        return tokens + interpolate_patch_pos_embed(pos[:, n_prefix_pos:], self.grid, grid)

    def patch_embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens [B, L, D] with their position embedding added, and the token grid."""
        tokens, grid = self.embed_patches(images)
        return self.add_position(tokens, grid), grid

    def add_prefix(self, tokens: torch.Tensor) -> torch.Tensor:
        """Prepend CLS/register tokens (with their position embedding where timm gives them one)."""
        prefix = self.prefix_tokens(tokens.shape[0])
        if prefix is None:
            return tokens
        if not self.model.no_embed_class and self.model.pos_embed is not None:
            prefix = prefix + self.model.pos_embed[:, : self.model.num_prefix_tokens]
        return torch.cat([prefix, tokens], dim=1)

    def run_blocks(
        self, tokens: torch.Tensor, return_blocks: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Blocks then final norm; optionally every block's output (prefix tokens removed)."""
        m = self.model
        x = m.norm_pre(m.pos_drop(tokens))
        outputs = []
        n_prefix = m.num_prefix_tokens
        for block in m.blocks:
            x = block(x)
            if return_blocks:
                outputs.append(x[:, n_prefix:])
        return m.norm(x), outputs

    def block_ffn_outputs(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """Each block's FFN branch output *before* its residual add, prefix tokens removed.

        data2vec 2.0's targets (`end_of_block_targets: false`): the blocks run as timm's `Block`
        does (x += attn branch; f = FFN branch; x += f) and f is kept. Needs that pre-norm layout.
        """
        m = self.model
        x = m.norm_pre(m.pos_drop(tokens))
        outputs = []
        for block in m.blocks:
            parts = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")
            if not all(hasattr(block, p) for p in parts):
                raise TypeError(f"{type(block).__name__} is not timm's pre-norm Block: no FFN output to take")
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            ffn = block.ls2(block.mlp(block.norm2(x)))
            x = x + block.drop_path2(ffn)
            outputs.append(ffn[:, m.num_prefix_tokens :])
        return outputs

    def forward_features(
        self, images: torch.Tensor, return_blocks: bool = False
    ) -> BackboneFeatures:
        tokens, grid = self.patch_embed(images)
        x, blocks = self.run_blocks(self.add_prefix(tokens), return_blocks)
        n_prefix = self.model.num_prefix_tokens
        global_vector = x[:, 0] if n_prefix else x.mean(dim=1)
        return BackboneFeatures(global_vector, x[:, n_prefix:], grid, blocks)
