"""CoKe's online constrained k-means: the algorithm as pure functions, then `ConstrainedKMeans`,
one clustering head's state kept as buffers (checkpoints, resume and device moves carry it).

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

import torch
import torch.nn.functional as F
from torch import nn


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


UNASSIGNED = -1  # label memory value of an instance never assigned yet


class ConstrainedKMeans(nn.Module):
    """K centres on the unit sphere, duals enforcing >= ratio x average cluster size, labels of N images.

    stage (single view only): the epoch from which the "moving average" stage 2 runs, with soft
    labels over `slots` (label, weight) pairs per image and the classifier averaged over epochs;
    None keeps stage 1 (hard labels, one slot) for the whole run.
    """

    def __init__(
        self,
        num_clusters: int,
        dim: int,
        num_samples: int,
        dual_lr: float = 20.0,
        ratio: float = 0.4,
        stage: int | None = None,
        slots: int = 5,
        soft_temperature: float = 0.5,
    ) -> None:
        super().__init__()
        self.num_clusters = int(num_clusters)
        self.dual_lr = float(dual_lr)
        self.ratio = float(ratio)
        self.stage = stage
        self.soft_temperature = float(soft_temperature)
        slots = int(slots) if stage is not None else 1
        centers = F.normalize(torch.randn(self.num_clusters, dim), dim=1)
        self.register_buffer("pre_centers", centers.clone())  # the fixed classifier of this epoch
        self.register_buffer("cur_centers", centers.clone())  # the online running means
        self.register_buffer("duals", torch.zeros(self.num_clusters))
        self.register_buffer("counters", torch.zeros(self.num_clusters, dtype=torch.long))
        dtype = compact_label_dtype(self.num_clusters)
        self.register_buffer("labels", torch.full((int(num_samples), slots), UNASSIGNED, dtype=dtype))
        if slots > 1:
            self.register_buffer("label_weights", torch.zeros(int(num_samples), slots))
        else:
            self.label_weights = None

    def in_stage_two(self, epoch: int) -> bool:
        return self.stage is not None and epoch >= self.stage

    @torch.no_grad()
    def assign(self, features: torch.Tensor, epoch: int) -> torch.Tensor:
        """argmax_k x . c_k + rho_k against the online centres (stage 2: this epoch's fixed ones)."""
        centers = self.pre_centers if self.in_stage_two(epoch) else self.cur_centers
        return assign_clusters(features, centers, self.duals)

    @torch.no_grad()
    def targets(self, indices: torch.Tensor, fresh: torch.Tensor, epoch: int) -> torch.Tensor:
        """This rank's training targets, read before this batch updates the memory.

        Epoch 0, and any image not assigned in an earlier epoch (e.g. dropped by drop_last), uses
        its fresh assignment; later epochs use the previous epoch's label (hard), or after the first
        stage-2 epoch the soft label from the running average of past assignments.
        """
        indices = indices.long()
        stored = self.labels[indices, 0].long()
        hard = torch.where((stored == UNASSIGNED) | (epoch == 0), fresh.long(), stored)
        if self.label_weights is None or self.stage is None or epoch <= self.stage:
            return hard
        weights = self.label_weights[indices]
        seen = weights.sum(dim=1, keepdim=True) > 0
        soft = soft_targets(self.labels[indices], torch.where(seen, weights, 0.0), self.num_clusters,
                            self.soft_temperature)
        one_hot = F.one_hot(hard, self.num_clusters).to(soft.dtype)
        return torch.where(seen, soft, one_hot)

    @torch.no_grad()
    def update(
        self,
        features: torch.Tensor,
        indices: torch.Tensor,
        labels: torch.Tensor,
        epoch: int,
        apply: torch.Tensor | None = None,
    ) -> None:
        """One global batch: projected dual ascent, running-mean centres, label memory.

        `apply`: a 0-dim bool tensor; when False (non-finite features) no state changes. Decided on the
        device with `torch.where`, so the caller never waits for the GPU to know.
        """

        def gated(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return new if apply is None else torch.where(apply, new, old)

        duals = dual_update(self.duals, labels, self.num_clusters, self.dual_lr, self.ratio)
        centers, counters = center_update(
            self.cur_centers, self.counters, features, labels, renormalize=not self.in_stage_two(epoch)
        )
        self.duals.copy_(gated(duals, self.duals))
        self.cur_centers.copy_(gated(centers, self.cur_centers))
        self.counters.copy_(gated(counters, self.counters))
        if self.label_weights is None:
            store_labels(self.labels[:, 0], indices, labels, apply)
        else:
            update_label_memory(self.labels, self.label_weights, indices, labels, epoch, self.stage, apply)

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's centres become the next classifier; counters restart. Returns size statistics."""
        sizes = self.counters.float()
        seen = sizes.sum()
        stats = {
            "min_cluster_size": sizes.min(),
            "max_cluster_size": sizes.max(),
            "size_lower_bound": seen * self.ratio / self.num_clusters,
            "empty_clusters": (sizes == 0).sum().float(),
        }
        pre, cur = average_centers(self.pre_centers, self.cur_centers, epoch, self.stage)
        self.pre_centers.copy_(pre)
        self.cur_centers.copy_(cur)
        self.counters.zero_()
        return stats

    def assigned_sizes(self) -> torch.Tensor:
        """Images per cluster in the label memory (the latest hard assignment of every image seen)."""
        stored = self.labels[:, 0].long()
        return torch.bincount(stored[stored >= 0], minlength=self.num_clusters)
