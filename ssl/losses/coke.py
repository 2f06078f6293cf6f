"""CoKe's pure functions: online constrained k-means state updates and the cluster-discrimination losses.

CoKe (Qian et al., CVPR 2022) clusters the l2-normalised projections online, with dual variables that
enforce a lower bound on every cluster's size, and trains the network to classify each image into the
cluster it was given in the *previous* epoch, against the previous epoch's centres.

Distributed contract: every state update takes the *global* (all-gathered, rank-ordered) batch of features,
labels and instance indices, and is deterministic on any device (no float atomics, explicit
last-write-wins for duplicate indices, float32 with autocast off). Every rank therefore holds bit-identical
state without relying on DDP re-broadcasting buffers. No update reads a value on the host or makes a shape
depend on the data (bincount, unique, boolean selection), so a GPU step never waits for the device.

State layouts, per clustering head:
  centers   [K, d]  float32, one unit-norm centre per *row* (the official code stores [d, K]; rows make the
                    per-cluster gather / sum / renormalise contiguous and match an nn.Linear weight).
  duals     [K]     float32, rho_k >= 0.
  counters  [K]     points seen per cluster this epoch (any numeric dtype; float32 is exact below 2**24).
  memory    [N]     previous-epoch hard label per instance (int16 is enough for K <= 32767).
  stage 2 (single view only): labels [N, S] and weights [N, S] float32, S = 5 (label, weight) slots.
Functions on the K-sized state are pure (they return new tensors); functions on the per-instance memories
update them in place, because those are ~1.28M rows and copying them every step would be wasteful.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _no_autocast(device: torch.device) -> torch.autocast:
    """A context that turns autocast off: clustering state must stay float32 even inside an AMP step."""
    return torch.autocast(device_type=device.type, enabled=False)


# ---------------------------------------------------------------------------------------------
# Online constrained k-means


@torch.no_grad()
def assign_clusters(features: torch.Tensor, centers: torch.Tensor, duals: torch.Tensor) -> torch.Tensor:
    """y_i = argmax_k (x_i . c_k + rho_k): the Lagrangian assignment of the constrained k-means.

    features [n, d] (l2-normalised), centers [K, d], duals [K] -> int64 labels [n]. Computed in float32
    with autocast off (the official code ran this matmul in fp16 under autocast); ties go to the lowest k.
    """
    with _no_autocast(features.device):
        scores = features.float() @ centers.float().t() + duals.float()
    return scores.argmax(dim=1)


def cluster_counts(labels: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Points per cluster, int64 [K]: `torch.bincount` without its host read of the largest label."""
    labels = labels.long()
    counts = torch.zeros(num_clusters, dtype=torch.long, device=labels.device)
    return counts.scatter_add_(0, labels, torch.ones_like(labels))


@torch.no_grad()
def dual_update(
    duals: torch.Tensor, labels: torch.Tensor, num_clusters: int, lr: float = 20.0, ratio: float = 0.4
) -> torch.Tensor:
    """Projected dual ascent rho <- max(0, rho - lr * (n_k / b - ratio / K)); returns new duals.

    Clusters that received less than `ratio` of the average share of the (global) batch gain rho and
    attract points. As in the official code the clamp only applies for a lower bound (ratio < 1); the
    subtraction and the addition are done in the code's order so the values match it bit for bit.
    """
    counts = cluster_counts(labels, num_clusters)
    new = duals - (lr / labels.numel()) * counts.to(duals.dtype)
    new = new + lr * (ratio / num_clusters)
    return new.clamp(min=0.0) if ratio < 1 else new


@torch.no_grad()
def center_update(
    centers: torch.Tensor,
    counters: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean of each cluster's points within the epoch; returns new (centers, counters).

    For every cluster k present in the batch, with old = counters[k] and new = old + n_k:
    c_k <- c_k * old / new + sum_{i->k} x_i / new, then (if renormalize) c_k is put back on the unit
    sphere. Absent clusters keep their centre. Counters are reset to zero each epoch, so the first batch
    of an epoch discards the previous centre of every cluster it touches. Per-cluster sums use a one-hot
    matmul rather than float index_add_, whose CUDA atomics would make ranks drift apart.
    """
    num_clusters = centers.shape[0]
    labels = labels.long()
    counts = cluster_counts(labels, num_clusters)
    present = counts > 0
    new_counters = counters + counts.to(counters.dtype)
    with _no_autocast(features.device):
        one_hot = F.one_hot(labels, num_clusters).to(torch.float32)
        sums = one_hot.t() @ features.float()
        old = counters.to(torch.float32)
        total = new_counters.to(torch.float32).clamp(min=1.0)  # only read where present, where it is >= 1
        moved = centers.float() * (old / total).unsqueeze(1) + sums / total.unsqueeze(1)
        if renormalize:
            moved = F.normalize(moved, dim=1)
        new_centers = torch.where(present.unsqueeze(1), moved, centers.float())
    return new_centers.to(centers.dtype), new_counters


@torch.no_grad()
def average_centers(
    pre: torch.Tensor, cur: torch.Tensor, epoch: int, stage: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """End-of-epoch centres; returns new (pre, cur). The caller also resets the counters to zero.

    Before `stage` (and always when stage is None: two- and multi-view) the epoch's online centres become
    the fixed classifier: pre <- cur. From `stage` on (single-view stage 2) the classifier is a running
    average over stage-2 epochs, f = 1 / (epoch - stage + 1):
    pre <- normalize((1 - f) pre + f normalize(cur)), and cur restarts from it.
    """
    if stage is None or epoch < stage:
        return cur.clone(), cur.clone()
    factor = 1.0 / (epoch - stage + 1)
    averaged = F.normalize((1.0 - factor) * pre + factor * F.normalize(cur, dim=1), dim=1)
    return averaged, averaged.clone()


# ---------------------------------------------------------------------------------------------
# Per-instance label memories


def compact_label_dtype(num_clusters: int) -> torch.dtype:
    """The smallest integer dtype that holds labels 0..K-1: int16 up to K = 32767, else int32."""
    return torch.int16 if num_clusters <= torch.iinfo(torch.int16).max else torch.int32


def label_memory_bytes(
    num_samples: int,
    heads: int,
    slots: int = 1,
    dtype: torch.dtype = torch.int16,
    weight_dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes of the per-instance label memory replicated on every rank, for reporting.

    labels [heads, N, slots] of `dtype`, plus float weights of the same shape when slots > 1 (stage 2).
    ImageNet (N = 1 281 167, 3 heads): int64 hard labels 30.7 MB, int16 7.7 MB; with 5 slots, int16 labels
    and float32 weights 115 MB (the official int64 labels + float32 weights + int64 slot index: 261 MB).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    size = num_samples * heads * slots * itemsize
    if slots > 1:
        size += num_samples * heads * slots * torch.empty((), dtype=weight_dtype).element_size()
    return size


def _last_occurrence(indices: torch.Tensor) -> torch.Tensor:
    """For every position, the position of the last occurrence of the same index (in batch order).

    Indexed writes with duplicate indices leave the winner undefined on CUDA; giving every duplicate the
    value of the last one makes "the last write wins" (the official code's CPU behaviour) explicit and
    deterministic. DistributedSampler pads with duplicates, so the gathered batch can hold an instance twice.
    A stable sort keeps the shapes static (no `unique`, which waits for the device to size its output).
    """
    n = indices.numel()
    order = torch.sort(indices, stable=True).indices
    ranks = torch.arange(n, device=indices.device)
    sorted_ids = indices[order]
    run_end = torch.ones(n, dtype=torch.bool, device=indices.device)
    run_end[:-1] = sorted_ids[1:] != sorted_ids[:-1]
    # In sorted order each run of equal indices ends at its last occurrence (stable sort); the
    # reversed running minimum of the run ends carries that position back over the whole run.
    ends = torch.where(run_end, ranks, n).flip(0).cummin(0).values.flip(0)
    last = torch.empty_like(order)
    last[order] = order[ends]
    return last


@torch.no_grad()
def store_labels(
    memory: torch.Tensor, indices: torch.Tensor, labels: torch.Tensor, apply: torch.Tensor | None = None
) -> None:
    """memory[indices] <- labels in place (global batch); for duplicate indices the last one wins.

    `apply`: a 0-dim bool tensor; when False the memory is written back unchanged (decided on the device).
    """
    if indices.numel() == 0:
        return
    rows = indices.long()
    new = labels[_last_occurrence(indices)].to(memory.dtype)
    if apply is not None:
        new = torch.where(apply, new, memory[rows])
    memory[rows] = new


@torch.no_grad()
def labels_for_loss(
    memory: torch.Tensor, indices: torch.Tensor, fresh_labels: torch.Tensor, epoch: int
) -> torch.Tensor:
    """Hard targets for this rank's images: the label assigned in the previous epoch (int64 [n]).

    Epoch 0 has no previous epoch, so the fresh assignment (this rank's rows of the global one) is used.
    Read before `store_labels` overwrites the memory with this epoch's assignment. (With padded duplicate
    images, the official code's epoch-0 read can return a duplicate's label instead; the difference is
    negligible and this is the intended semantics.)
    """
    if epoch == 0:
        return fresh_labels.long()
    return memory[indices.long()].long()


@torch.no_grad()
def update_label_memory(
    labels: torch.Tensor,
    weights: torch.Tensor,
    indices: torch.Tensor,
    new_labels: torch.Tensor,
    epoch: int,
    stage: int,
    apply: torch.Tensor | None = None,
) -> None:
    """Stage-2 soft-label memory: a running average of one-hot assignments kept in S slots, in place.

    labels [N, S] int, weights [N, S] float; indices / new_labels are the global batch (duplicates: the
    last wins). Before `stage` only the hard label in slot 0 is written; at `stage` slot 0 gets weight 1
    and the others 0. Later, with f = 1 / (epoch - stage + 1): reuse the slot already holding the new label,
    else evict the smallest-weight slot and renormalise the rest by 1 / (1 - evicted weight); then scale all
    weights by (1 - f) and add f to the new label's slot. Only slots with positive weight count as holding
    a label (the official code's ones-initialised memory makes label 1 also match never-used slots).
    Every duplicate of an index computes the same row from the last one's label, so all writes agree.
    `apply`: a 0-dim bool tensor; when False every row is written back unchanged (decided on the device).
    """
    if indices.numel() == 0:
        return
    rows = indices.long()
    new = new_labels[_last_occurrence(indices)].to(labels.dtype)
    slots = labels.shape[1]

    def gated(memory: torch.Tensor, index: tuple, value: torch.Tensor | float) -> None:
        memory[index] = value if apply is None else torch.where(apply, value, memory[index])

    if epoch < stage or slots == 1:
        gated(labels, (rows, 0), new)
        if epoch >= stage:
            gated(weights, (rows, 0), torch.ones_like(new, dtype=weights.dtype))
        return
    if epoch == stage:
        gated(labels, (rows, 0), new)
        fresh = torch.zeros(rows.numel(), slots, dtype=weights.dtype, device=weights.device)
        fresh[:, 0] = 1.0
        gated(weights, (rows,), fresh)
        return
    factor = 1.0 / (epoch - stage + 1)
    row_labels, row_weights = labels[rows], weights[rows]
    match = (row_labels == new.unsqueeze(1)) & (row_weights > 0)
    reuse = match.any(dim=1)
    slot = torch.where(reuse, match.to(torch.uint8).argmax(dim=1), row_weights.argmin(dim=1)).unsqueeze(1)
    evicted = torch.where(reuse.unsqueeze(1), 0.0, row_weights.gather(1, slot))
    row_weights = row_weights.scatter(1, slot, row_weights.gather(1, slot) - evicted)
    row_weights = row_weights * ((1.0 - factor) / (1.0 - evicted))
    row_weights = row_weights.scatter_add(1, slot, torch.full_like(evicted, factor))
    gated(labels, (rows,), row_labels.scatter(1, slot, new.unsqueeze(1)))
    gated(weights, (rows,), row_weights)


@torch.no_grad()
def soft_targets(
    labels: torch.Tensor, weights: torch.Tensor, num_clusters: int, t: float = 0.5
) -> torch.Tensor:
    """Stage-2 soft targets [n, K] from memory rows labels / weights [n, S].

    The slot weights are scattered into K classes; nonzero entries become exp(w / t) (sharpening towards
    the dominant label), zeros stay exactly 0 so clusters never assigned get no mass; rows sum to 1.
    """
    weights = weights.float()
    safe = torch.where(weights > 0, labels.long(), torch.zeros_like(labels, dtype=torch.long))
    dense = torch.zeros(labels.shape[0], num_clusters, device=weights.device)
    dense = dense.scatter_add(1, safe, weights)
    dense = torch.where(dense > 0, torch.exp(dense / t), torch.zeros_like(dense))
    return dense / dense.sum(dim=1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Losses


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
