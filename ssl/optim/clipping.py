"""Gradient clipping as DINO does it (per parameter) and the usual global-norm variant.

Both work on FSDP2-sharded gradients too: each rank holds a slice of such a gradient, so its norm
is the square root of the all-reduced sum of the slices' squared norms (one collective for all).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from ssl.sharding import is_sharded, local


def gradient_norms(grads: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each gradient's full L2 norm, the tensors to scale in place: local shards or the grads)."""
    tensors = [local(g) for g in grads]
    norms = list(torch._foreach_norm(tensors))
    sharded = [i for i, g in enumerate(grads) if is_sharded(g)]
    if sharded and dist.is_available() and dist.is_initialized():
        squares = torch.stack([norms[i].float() ** 2 for i in sharded])
        dist.all_reduce(squares)
        for i, square in zip(sharded, squares.sqrt()):
            norms[i] = square.to(norms[i].dtype)
    return norms, tensors


@torch.no_grad()
def clip_per_parameter(params: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale each tensor's gradient to norm <= max_norm on its own: g *= C / (||g|| + 1e-6).

    This is DINO's `clip_gradients`; it is not global-norm clipping, so Lightning's
    `gradient_clip_val` cannot reproduce it. Vectorised with foreach ops, no host syncs.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms, tensors = gradient_norms(grads)
    factors = [(max_norm / (n + 1e-6)).clamp(max=1.0) for n in norms]
    torch._foreach_mul_(tensors, factors)


@torch.no_grad()
def clip_global_norm(params: Iterable[torch.nn.Parameter], max_norm: float) -> None:
    """Scale all gradients together so their joint norm is <= max_norm (torch's clip_grad_norm_)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    norms, tensors = gradient_norms(grads)
    total = torch.stack([n.float() for n in norms]).norm()
    torch._foreach_mul_(tensors, (max_norm / (total + 1e-6)).clamp(max=1.0))


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float | None, mode: str) -> None:
    """Dispatch on the configured mode: per_parameter, global_norm or none."""
    if not max_norm or mode == "none":
        return
    if mode == "per_parameter":
        clip_per_parameter(params, max_norm)
    elif mode == "global_norm":
        clip_global_norm(params, max_norm)
    else:
        raise ValueError(f"unknown clip mode '{mode}'; valid: per_parameter, global_norm, none")
