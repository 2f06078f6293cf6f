"""Cross-entropy over the labelled rows of a batch whose other rows carry label -1.

In mixed pretraining most rows have no label and each rank holds a different number of labelled
ones. The loss must skip those rows without a host sync (no `.item()`, no branch on the count)
and give, after DDP averages the ranks' gradients, the gradient of the mean over all labelled
rows of the global batch: each rank sums its own terms and divides by the all-reduced count
over the world size. A batch without a labelled row gives 0, still attached to the graph, so
every rank backpropagates through the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl.distributed import all_reduce_sum, world_size


def labelled_mask(labels: torch.Tensor) -> torch.Tensor:
    """True where a row has a label (labels >= 0)."""
    return labels >= 0


def masked_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """sum of CE over labelled rows x world size / labelled rows of all ranks (at least 1).

    logits [B, C], labels [B] (negative: unlabelled). An unlabelled row's gradient is exactly
    zero, and neither its logits nor its (negative) label change the value.
    """
    mask = labelled_mask(labels)
    per_sample = F.cross_entropy(
        logits.float(), labels.clamp_min(0), reduction="none", label_smoothing=float(label_smoothing)
    )
    total = torch.where(mask, per_sample, torch.zeros_like(per_sample)).sum()
    count = all_reduce_sum(mask.sum().to(per_sample.dtype).detach())
    return total * world_size() / count.clamp_min(1.0)


@torch.no_grad()
def labelled_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Top-1 accuracy over this rank's labelled rows (0 when there is none), no host sync."""
    mask = labelled_mask(labels)
    correct = ((logits.argmax(dim=-1) == labels) & mask).sum()
    return correct.float() / mask.sum().clamp_min(1).float()
