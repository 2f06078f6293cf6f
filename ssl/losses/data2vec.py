"""data2vec's regression targets and loss (pure functions).

Targets: the teacher's top-K block outputs, each normalised without parameters (layer norm over
channels, data2vec 1.0 vision; or instance norm over tokens per channel, data2vec 2.0), averaged,
then optionally layer-normalised again. All in float32, eps 1e-5 as the functional defaults.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

TARGET_NORMS = ("layer", "instance", "none")


def normalize_layer(features: torch.Tensor, norm: str) -> torch.Tensor:
    """[B, L, D] -> same, normalised per token over D ("layer") or per channel over L ("instance")."""
    x = features.float()
    if norm == "layer":
        return F.layer_norm(x, x.shape[-1:])
    if norm == "instance":
        return F.instance_norm(x.transpose(1, 2)).transpose(1, 2)
    if norm == "none":
        return x
    raise ValueError(f"unknown target normalisation '{norm}'; valid: {', '.join(TARGET_NORMS)}")


def data2vec_targets(
    block_outputs: Sequence[torch.Tensor],
    top_k: int,
    layer_norm: str = "layer",
    final_layer_norm: bool = True,
) -> torch.Tensor:
    """Average of the last `top_k` normalised block outputs [B, L, D], float32."""
    if not 0 < top_k <= len(block_outputs):
        raise ValueError(f"top_k must be in [1, {len(block_outputs)}] (the number of blocks), got {top_k}")
    layers = [normalize_layer(y, layer_norm) for y in block_outputs[-top_k:]]
    target = torch.stack(layers).mean(dim=0)
    if final_layer_norm:
        target = F.layer_norm(target, target.shape[-1:])
    return target


def regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Mean over all elements (the BEiT-repo convention): Smooth-L1 with `beta`, or MSE if beta=0."""
    pred, target = pred.float(), target.float()
    if beta == 0:
        return F.mse_loss(pred, target)
    return F.smooth_l1_loss(pred, target, beta=beta)


def masked_regression_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float = 2.0
) -> torch.Tensor:
    """`regression_loss` over the masked positions only: pred / target [B, L, D], mask [B, L] bool.

    The same mean as `regression_loss(pred[mask], target[mask])`, without selecting the rows:
    a boolean selection sizes its output from the data, which makes the host wait for a GPU.
    """
    pred, target = pred.float(), target.float()
    if beta == 0:
        per_element = F.mse_loss(pred, target, reduction="none")
    else:
        per_element = F.smooth_l1_loss(pred, target, beta=beta, reduction="none")
    selected = torch.where(mask.unsqueeze(-1), per_element, 0.0)
    return selected.sum() / (mask.sum() * pred.shape[-1])


def masked_feature_std(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across the masked rows (fairseq's var monitor).

    x [B, L, D], mask [B, L] bool; 0 with fewer than two masked rows. No boolean selection (see above).
    """
    rows = mask.reshape(-1, 1)
    x = torch.where(rows, x.float().reshape(rows.shape[0], -1), 0.0)
    n = rows.sum()
    mean = x.sum(dim=0) / n.clamp(min=1)
    var = torch.where(rows, (x - mean) ** 2, 0.0).sum(dim=0) / (n - 1).clamp(min=1)
    return torch.where(n > 1, var.sqrt().mean(), 0.0)
