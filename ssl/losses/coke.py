"""CoKe's cluster-discrimination losses: pure functions of logits and targets.

The network classifies each image into the cluster it was given in the *previous* epoch, against
the previous epoch's centres (a fixed classifier): hard labels (stage 1), soft labels (stage 2,
single view) or, with two views, the other view's prediction as a soft target. The clustering that
produces those labels is ssl/objectives/coke_clustering.py.
"""


from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cluster_logits(features: torch.Tensor, centers: torch.Tensor, temperature: float) -> torch.Tensor:
    """normalize(x) . c_k / T against the fixed previous-epoch centres [K, d]; no gradient reaches them."""
    return F.normalize(features, dim=1) @ centers.detach().t().to(features.dtype) / temperature


def _soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-mean_i sum_k target_ik log softmax(logits)_ik in float32; the target need not sum to 1."""
    return -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Hard (int [n]) or soft (float [n, K]) cross-entropy in float32."""
    if target.is_floating_point():
        return _soft_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), target.long())


def single_view_loss(
    pred_logits: Sequence[torch.Tensor],
    proj_logits: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    beta: float = 0.5,
) -> torch.Tensor:
    """beta * CE(predictor) + (1 - beta) * CE(projection), each averaged over the clustering heads.

    targets[j] is head j's hard label [n] (stage 1) or soft target [n, K_j] (stage 2). The parser's
    default beta is 0.5; the published single-view run uses beta = 1 (predictor branch only).
    """
    heads = len(targets)
    pred = sum(_cross_entropy(z, y) for z, y in zip(pred_logits, targets))
    proj = sum(_cross_entropy(z, y) for z, y in zip(proj_logits, targets))
    return (beta * pred + (1.0 - beta) * proj) / heads


def two_view_loss(
    pred1: Sequence[torch.Tensor],
    pred2: Sequence[torch.Tensor],
    proj1: Sequence[torch.Tensor],
    proj2: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    alpha: float = 0.2,
) -> torch.Tensor:
    """Two 224 views: alpha * hard CE + (1 - alpha) * CE against the other view's softmax(proj).

    Summed over 2 views x {pred, proj} x heads, scaled by 0.5 / (2 * heads) as in the official code.
    The cross-view targets are detached: each view is pulled towards the other's projection, which carries
    the augmentation-invariance the one-epoch-old hard labels cannot.
    """
    heads = len(labels)
    total = 0.0
    for j in range(heads):
        soft1 = F.softmax(proj1[j].detach().float(), dim=1)
        soft2 = F.softmax(proj2[j].detach().float(), dim=1)
        for logits, other in ((pred1[j], soft2), (pred2[j], soft1), (proj1[j], soft2), (proj2[j], soft1)):
            total = total + alpha * _cross_entropy(logits, labels[j])
            total = total + (1.0 - alpha) * _soft_cross_entropy(logits, other)
    return total * (0.5 / (2 * heads))


def small_crop_loss(
    pred_small: Sequence[Sequence[torch.Tensor]],
    proj_small: Sequence[Sequence[torch.Tensor]],
    proj1: Sequence[torch.Tensor],
    proj2: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    alpha: float = 0.2,
) -> torch.Tensor:
    """Multi-crop small views: 2 alpha * hard CE + (1 - alpha) * CE against softmax(proj1) + softmax(proj2).

    pred_small[j][s] / proj_small[j][s]: head j, small crop s. The target is the unnormalised sum of both
    large views' distributions (mass 2, matching the doubled hard weight); normalised by
    0.5 / (2 * snum * heads) as in the official code.
    """
    heads, snum = len(labels), len(pred_small[0])
    total = 0.0
    for j in range(heads):
        target = F.softmax(proj1[j].detach().float(), dim=1) + F.softmax(proj2[j].detach().float(), dim=1)
        for s in range(snum):
            for logits in (pred_small[j][s], proj_small[j][s]):
                total = total + 2.0 * alpha * _cross_entropy(logits, labels[j])
                total = total + (1.0 - alpha) * _soft_cross_entropy(logits, target)
    return total * (0.5 / (2 * snum * heads))


def multi_crop_loss(
    pred1: Sequence[torch.Tensor],
    pred2: Sequence[torch.Tensor],
    proj1: Sequence[torch.Tensor],
    proj2: Sequence[torch.Tensor],
    pred_small: Sequence[Sequence[torch.Tensor]],
    proj_small: Sequence[Sequence[torch.Tensor]],
    labels: Sequence[torch.Tensor],
    alpha: float = 0.2,
    beta: float = 0.5,
) -> torch.Tensor:
    """beta * two_view_loss + (1 - beta) * small_crop_loss (2 x 224 + snum x 96 crops)."""
    large = two_view_loss(pred1, pred2, proj1, proj2, labels, alpha)
    small = small_crop_loss(pred_small, proj_small, proj1, proj2, labels, alpha)
    return beta * large + (1.0 - beta) * small
