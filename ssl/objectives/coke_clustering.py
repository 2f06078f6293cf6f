"""One CoKe clustering head: online constrained k-means state, kept as buffers.

Centres, duals, counters and the per-instance label memory are registered buffers, so
checkpoints, resume and device moves carry them. Every update takes the *global* (all-gathered)
batch and is deterministic (ssl/losses/coke.py), so all ranks hold identical state by
construction rather than through DDP re-broadcasting rank 0's buffers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl.losses.coke import (
    assign_clusters,
    average_centers,
    center_update,
    compact_label_dtype,
    dual_update,
    soft_targets,
    store_labels,
    update_label_memory,
)

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
