"""data2vec 2.0's loss conventions (fairseq `Data2VecMultiModel.d2v_loss` + the model criterion).

Per predicted row: sum over the D channels of the L2 (or Smooth-L1 with beta > 0) error, times
1/sqrt(D) (`loss_scale: null`). The trainer divides the summed loss by the sample size, the number
of masked tokens, so the regression term is the mean of that row loss over masked tokens. The CLS
term is multiplied by `cls_loss` x sample size before that division, so it ends up as `cls_loss`
x the *sum* over this device's clones of the CLS row loss: its weight grows with the per-device
batch x clone_batch (256 in the base config). Targets: `ssl.losses.data2vec.data2vec_targets` with
instance norm per layer and a final layer norm.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def row_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 0.0) -> torch.Tensor:
    """[..., D] -> [...]: sum over D of the L2 (beta 0) or Smooth-L1 error, x 1/sqrt(D), float32."""
    pred, target = pred.float(), target.float()
    if beta == 0:
        per_element = F.mse_loss(pred, target, reduction="none")
    else:
        per_element = F.smooth_l1_loss(pred, target, reduction="none", beta=beta)
    return per_element.sum(dim=-1) / math.sqrt(pred.shape[-1])


def masked_token_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, beta: float = 0.0
) -> torch.Tensor:
    """Mean of `row_loss` over the masked positions: pred / target [N, L, D], mask [N, L] bool.

    No boolean row selection (its output size would come from the data, a host sync on GPUs).
    """
    rows = row_loss(pred, target, beta)
    return torch.where(mask, rows, 0.0).sum() / mask.sum()


def cls_loss(pred: torch.Tensor, target: torch.Tensor, weight: float, beta: float = 0.0) -> torch.Tensor:
    """`weight` x the sum over rows of `row_loss`: pred [N, D] (the encoder's CLS output), target
    [N, D] (the mean over positions of each image's target, repeated per clone)."""
    return weight * row_loss(pred, target, beta).sum()
