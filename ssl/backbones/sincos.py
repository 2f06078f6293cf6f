"""Fixed 2-D sine-cosine position embeddings (MAE's `get_2d_sincos_pos_embed`)."""

from __future__ import annotations

import torch


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[N, dim]: sin(pos * w_j) for j < dim/2, then cos(pos * w_j), with w_j = 10000^(-j / (dim/2))."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.double().reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, grid: tuple[int, int], prefix_tokens: int = 0) -> torch.Tensor:
    """[prefix + h*w, dim] float32; patch index = row * w + col; prefix rows are zeros.

    As in MAE's code the first half of the channels encodes the *column* and the second half the
    row (the official names of the halves are swapped; the values are what matters).
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {dim}")
    h, w = grid
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)
    if prefix_tokens:
        emb = torch.cat([torch.zeros(prefix_tokens, dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()
