"""DINO-style self-attention maps: the last block's CLS query over the patch keys, per head.

timm's fused kernel (scaled_dot_product_attention) never materialises the attention matrix, so the
maps are recomputed from the last block's own `qkv` projection (and q/k norms) on the exact input
its attention receives, captured with a forward pre-hook: no timm internals are patched. Masks
follow facebookresearch/dino's visualize_attention.py: per head, the fewest patches that hold a
given fraction of the attention mass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.utils import make_grid

DISPLAY_SIZE = 96  # small images (28 px) are enlarged, nearest-neighbour, for viewing

# Distinct colours (RGB in [0, 1]) of the heads' masks, cycled when a model has more heads.
HEAD_COLOURS = torch.tensor([
    [0.90, 0.10, 0.10], [0.10, 0.60, 0.95], [0.10, 0.80, 0.25], [1.00, 0.75, 0.00],
    [0.70, 0.20, 0.85], [0.00, 0.85, 0.85], [1.00, 0.45, 0.00], [0.95, 0.35, 0.65],
    [0.55, 0.85, 0.10], [0.35, 0.35, 1.00], [0.60, 0.40, 0.20], [0.95, 0.95, 0.95],
])


def last_attention(backbone: nn.Module) -> nn.Module | None:
    """The last block's attention module of a ViT backbone, or None for anything else."""
    model = getattr(backbone, "model", None)
    blocks = getattr(model, "blocks", None)
    if not getattr(backbone, "is_vit", False) or blocks is None or len(blocks) == 0:
        return None
    return getattr(blocks[-1], "attn", None)


def has_cls_attention(backbone: nn.Module) -> bool:
    """Whether `cls_attention_maps` can draw this backbone: a ViT with a CLS token and timm Attention."""
    attn = last_attention(backbone)
    if attn is None or getattr(backbone.model, "cls_token", None) is None:
        return False
    return all(hasattr(attn, name) for name in ("qkv", "num_heads", "head_dim", "scale", "q_norm", "k_norm"))


def check_cls_attention(backbone: nn.Module) -> None:
    """Raise a ValueError that says why a backbone has no CLS attention maps."""
    if last_attention(backbone) is None:
        raise ValueError(
            f"attention maps need a ViT backbone (ssl.backbones.vit.ViTBackbone), "
            f"not {type(backbone).__name__}"
        )
    if getattr(backbone.model, "cls_token", None) is None:
        raise ValueError("attention maps need a CLS token: this ViT was built with class_token=False")
    if not has_cls_attention(backbone):
        raise ValueError(
            f"the last block's attention ({type(last_attention(backbone)).__name__}) is not a timm "
            "Attention with a fused qkv projection"
        )


@torch.no_grad()
def cls_attention_maps(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """[B, heads, h, w]: each head's attention of the CLS query over the patch keys, last block.

    Renormalised over the patches (the CLS and register keys are left out), so each map sums to 1;
    DINO's thresholded masks renormalise the same way, so they are unchanged. Runs in the
    backbone's current mode: call it in eval mode.
    """
    check_cls_attention(backbone)
    attn = last_attention(backbone)
    captured: list[torch.Tensor] = []
    handle = attn.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        tokens, grid = backbone.patch_embed(images)
        backbone.run_blocks(backbone.add_prefix(tokens))
    finally:
        handle.remove()
    x = captured[-1]
    batch, length, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, length, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    logits = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # [B, heads, 1, N]
    weights = logits.softmax(dim=-1)[:, :, 0, backbone.model.num_prefix_tokens:]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.reshape(batch, attn.num_heads, *grid)


def threshold_masks(attn: torch.Tensor, keep: float = 0.6) -> torch.Tensor:
    """Boolean masks [..., h, w]: per map, the fewest highest patches holding `keep` of its mass.

    DINO's rule: sort ascending, drop the patches whose cumulative (normalised) mass stays within
    1 - keep. Computed in float64 so that the kept mass is >= keep up to rounding.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep is a fraction of the attention mass in (0, 1]; got {keep}")
    flat = attn.detach().flatten(-2).double()
    flat = flat / flat.sum(dim=-1, keepdim=True)
    values, order = flat.sort(dim=-1)
    kept_sorted = values.cumsum(dim=-1) > (1.0 - keep)
    masks = torch.empty_like(kept_sorted).scatter_(-1, order, kept_sorted)
    return masks.reshape(attn.shape)


def denormalize(images: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """Normalised [B, 3, H, W] images back to [0, 1] pixels."""
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().float().cpu() * std + mean).clamp(0, 1)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """[..., H, W] values in [0, 1] -> [..., 3, H, W] "hot" colours (black, red, yellow, white)."""
    ramp = [(values * 3 - i).clamp(0, 1) for i in range(3)]
    return torch.stack(ramp, dim=-3)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, h, w] patch maps to pixel resolution, one block per patch (nearest)."""
    return F.interpolate(maps.float(), size=size, mode="nearest")


def heat_overlay(pixels: torch.Tensor, maps: torch.Tensor, alpha: float = 0.6) -> torch.Tensor:
    """[B, heads, 3, H, W]: each head's map blended over its image.

    Each map is stretched to its own min..max (as DINO's `plt.imsave` of a map does): a nearly
    uniform map of an early checkpoint still shows where its attention is highest.
    """
    flat = maps.flatten(-2)
    low, high = flat.amin(dim=-1)[..., None, None], flat.amax(dim=-1)[..., None, None]
    scaled = (maps - low) / (high - low).clamp_min(1e-12)
    heat = heat_colours(upsample(scaled, pixels.shape[-2:]))
    return (1 - alpha) * pixels[:, None] + alpha * heat


def mask_overlay(pixels: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W]: each head's mask in its own colour over the image, uncovered pixels dimmed."""
    heads = masks.shape[1]
    colours = HEAD_COLOURS[torch.arange(heads) % len(HEAD_COLOURS)]  # [heads, 3]
    cover = upsample(masks, pixels.shape[-2:])  # [B, heads, H, W]
    count = cover.sum(dim=1, keepdim=True)
    mixed = torch.einsum("bnhw,nc->bchw", cover, colours) / count.clamp_min(1)
    return torch.where(count > 0, 0.5 * pixels + 0.5 * mixed, 0.35 * pixels)


def to_picture(rows: torch.Tensor, columns: int, padding: int = 2) -> Image.Image:
    """[N, 3, H, W] pixels in [0, 1], laid out `columns` per row, enlarged when small."""
    size = rows.shape[-1]
    if size < DISPLAY_SIZE:
        rows = F.interpolate(rows, scale_factor=-(-DISPLAY_SIZE // size), mode="nearest")
    grid = make_grid(rows.clamp(0, 1), nrow=columns, padding=padding, pad_value=1.0)
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def overlay(pixels: torch.Tensor, maps: torch.Tensor, masks: torch.Tensor | None = None) -> Image.Image:
    """Grid with one column per image; rows: the image, each head's map over it, the heads' masks.

    `pixels` are [B, 3, H, W] in [0, 1] (see `denormalize`), `maps` [B, heads, h, w] from
    `cls_attention_maps`, `masks` [B, heads, h, w] from `threshold_masks` (no mask row when None).
    """
    pixels = pixels.detach().float().cpu()
    maps = maps.detach().float().cpu()
    heads = heat_overlay(pixels, maps)  # [B, heads, 3, H, W]
    rows = [pixels, *heads.unbind(dim=1)]
    if masks is not None:
        rows.append(mask_overlay(pixels, masks.detach().cpu().float()))
    return to_picture(torch.cat(rows), columns=pixels.shape[0])
