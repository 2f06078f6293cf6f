"""DINO's cross-entropy between centred, sharpened teacher and student distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl.distributed import all_reduce_sum, world_size


def teacher_probabilities(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """Centred, sharpened teacher distribution softmax((t - c) / tau_t) in float32, detached."""
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()


def dino_loss_from_probs(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor, num_crops: int, student_temp: float = 0.1
) -> torch.Tensor:
    """The DINO cross-entropy given the teacher's probabilities (see `dino_loss`)."""
    student = F.log_softmax(student_logits.float() / student_temp, dim=-1).chunk(num_crops)
    n_global = teacher_probs.shape[0] // student[0].shape[0]
    teacher = teacher_probs.chunk(n_global)
    # sum_i sum_{v != i} q_i . log p_v  =  (sum_i q_i) . (sum_v log p_v)  -  sum_i q_i . log p_i:
    # three products instead of 2(N + 1), the same sum.
    all_pairs = (sum(teacher) * sum(student)).sum(dim=-1)
    same_crop = sum((q * lp).sum(dim=-1) for q, lp in zip(teacher, student))
    pairs = n_global * num_crops - min(n_global, num_crops)
    return -(all_pairs - same_crop).mean() / pairs


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    num_crops: int,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """Mean over every (teacher global view i, student view v != i) pair of H(q_i, p_v).

    student_logits: [(n_global + n_local) * B, K] in crop-major order.
    teacher_logits: [n_global * B, K], the teacher's global crops in the same order.
    With 2 globals and N locals there are 2(N + 1) pairs; a teacher view is never compared with
    the student's view of the same crop. Softmaxes run in float32.
    """
    probs = teacher_probabilities(teacher_logits, center, teacher_temp)
    return dino_loss_from_probs(student_logits, probs, num_crops, student_temp)


@torch.no_grad()
def updated_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """EMA of the teacher's mean logit over the global batch (row sums all-reduced over ranks)."""
    batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
    return center * momentum + batch_center * (1 - momentum)
