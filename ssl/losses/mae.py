"""MAE's pixel reconstruction loss and the patch layout it is defined on (pure functions)."""

from __future__ import annotations

import torch


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, L, p*p*C]; patch index row * (W/p) + col, inner order (py, px, c)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"patch size {p} does not divide the image size {h}x{w}")
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bcyixj->byxijc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """The exact inverse of `patchify`: [B, L, p*p*C] -> [B, C, H, W]."""
    b = patches.shape[0]
    gh, gw = grid
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    x = torch.einsum("byxijc->bcyixj", x)
    return x.reshape(b, channels, gh * p, gw * p)


def normalize_patches(target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """norm_pix_loss target: per patch (t - mean) / sqrt(var + eps), *unbiased* variance as MAE."""
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps) ** 0.5


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool = True
) -> torch.Tensor:
    """Mean over removed patches of the per-patch MSE (visible patches do not count).

    pred, target [B, L, P]; mask [B, L] with 1 = removed. Computed in float32.
    """
    target = target.float()
    if norm_pix:
        target = normalize_patches(target)
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    mask = mask.to(per_patch.dtype)
    return (per_patch * mask).sum() / mask.sum()
