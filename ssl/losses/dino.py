"""DINO's cross-entropy between centred, sharpened teacher and student distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl.distributed import all_reduce_sum, world_size


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
    student = (student_logits.float() / student_temp).chunk(num_crops)
    n_global = teacher_logits.shape[0] // student[0].shape[0]
    teacher = F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1).detach()
    teacher = teacher.chunk(n_global)
    log_p = [F.log_softmax(s, dim=-1) for s in student]
    total = student_logits.new_zeros((), dtype=torch.float32)
    pairs = 0
    for i, q in enumerate(teacher):
        for v, lp in enumerate(log_p):
            if v == i:
                continue
            total = total + torch.sum(-q * lp, dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def updated_center(
    center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """EMA of the teacher's mean logit over the global batch (row sums all-reduced over ranks)."""
    batch_sum = all_reduce_sum(teacher_logits.float().sum(dim=0, keepdim=True))
    batch_center = batch_sum / (teacher_logits.shape[0] * world_size())
    return center * momentum + batch_center * (1 - momentum)
