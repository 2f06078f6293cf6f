"""Cross-rank helpers that degrade to no-ops in a single process."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (no-op without a process group); returns it."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0 (ranks may hold different lengths)."""
    return all_gather_with_offset(tensor)[0]


def all_gather_with_offset(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`all_gather_cat`, plus where this rank's rows start in the result (ranks in order).

    No gradient flows through the gather: callers use it for detached statistics and state.
    """
    n = world_size()
    if n == 1:
        return tensor, 0
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(n)]
    dist.all_gather(lengths, length)
    sizes = [int(k) for k in lengths]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in range(n)]
    dist.all_gather(gathered, padded)
    offset = sum(sizes[: dist.get_rank()])
    return torch.cat([g[:k] for g, k in zip(gathered, sizes)]), offset
