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


def feature_std(x: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the per-dimension std across rows (a collapse monitor, fairseq's var)."""
    return x.float().std(dim=0).mean() if x.shape[0] > 1 else x.new_zeros(())
