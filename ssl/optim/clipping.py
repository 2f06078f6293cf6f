"""Gradient clipping as DINO does it (per parameter) and the usual global-norm variant."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def clip_per_parameter(params: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each tensor's gradient to norm <= max_norm on its own: g *= C / (||g|| + 1e-6).

    This is DINO's `clip_gradients`; it is not global-norm clipping, so Lightning's
    `gradient_clip_val` cannot reproduce it. Vectorised with foreach ops, no host syncs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads)
    factors = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(grads, factors)


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None, mode: str) -> None:
    """Dispatch on the configured mode: per_parameter, global_norm or none."""
    if not max_norm or mode == "none":
        return
    if mode == "per_parameter":
        clip_per_parameter(params, max_norm)
    elif mode == "global_norm":
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)
    else:
        raise ValueError(f"unknown clip mode '{mode}'; valid: per_parameter, global_norm, none")
