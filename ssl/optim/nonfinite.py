"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

One NaN batch (a corrupt image, a loss spike, an fp16 overflow) must not poison the weights, the
optimizer's moments or the EMA teacher: the step is skipped and counted. A run that keeps producing
them has diverged, so after `max_consecutive` skipped steps in a row it stops with advice and the
last checkpoint written while training was still healthy, instead of spending hours on NaNs.

The bookkeeping here is pure Python; `SSLModule` computes the flags and applies the decision.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ssl.sharding import local

LIKELY_CAUSES = (
    "the learning rate is too high or its warm-up too short (optimizer.lr, optimizer.warmup_epochs; "
    "the lr also scales with the global batch, see optimizer.scale_lr_with_batch)",
    "fp16 overflow: use trainer.precision=bf16-mixed on GPUs that support it, or 32-true",
    "DINO: a teacher temperature too low (objective.dino.teacher_temp, warmup_teacher_temp) or an "
    "unnormalised prototype layer (objective.dino.norm_last_layer=true); gradient clipping off "
    "(optimizer.clip_grad)",
    "corrupt or non-finite input images in the dataset",
)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive optimizer steps had a non-finite loss or gradient; training stops."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> torch.Tensor:
    """0-dim bool tensor: every element of every tensor is finite (no host sync; one fused norm).

    FSDP-sharded tensors are checked on this rank's shard; callers combine the ranks' answers.
    """
    present = [local(t.detach()) for t in tensors if t is not None]
    if not present:
        return torch.tensor(True)
    norms = torch._foreach_norm(present)  # inf or nan iff the tensor holds one
    return torch.isfinite(torch.stack([n.float() for n in norms])).all()


def stop_message(consecutive: int, skipped: int, step: int, checkpoint: str | None) -> str:
    """What happened, what usually causes it, and where to restart from."""
    causes = "\n".join(f"  - {cause}" for cause in LIKELY_CAUSES)
    if checkpoint:
        restart = (f"Last good checkpoint: {checkpoint}\n"
                   f"(continue from it with resume={checkpoint} once the cause is fixed)")
    else:
        restart = "Last good checkpoint: none (no checkpoint was written while training was healthy)"
    return (
        f"training stopped: {consecutive} consecutive optimizer steps had a non-finite loss or "
        f"gradient (the last at step {step}; {skipped} skipped in all). Those steps were skipped: "
        f"weights, optimizer state and EMA teacher are as the last applied step left them.\n"
        f"Likely causes:\n{causes}\n{restart}\n"
        "Allow more with guard.max_consecutive_nonfinite=<N> (0: never stop)."
    )


@dataclass
class NonFiniteGuard:
    """Counters of skipped steps. `max_consecutive` 0 or None: skip and count, never stop.

    `overflows` are fp16 GradScaler overflows (finite loss, inf gradients): the scaler skips those
    steps and lowers its scale, which is normal early in training, so they count on their own and
    never stop the run.
    """

    max_consecutive: int | None = 20
    consecutive: int = 0
    skipped: int = 0
    overflows: int = 0
    last_good_checkpoint: str | None = None

    def good(self, checkpoint: str | None = None) -> None:
        """A step was applied. `checkpoint`: the newest one on disk, whose weights this step used."""
        self.consecutive = 0
        if checkpoint:
            self.last_good_checkpoint = checkpoint

    def overflow(self) -> None:
        """The GradScaler skipped the step (fp16); not a failure."""
        self.overflows += 1

    def bad(self, step: int) -> None:
        """A step was skipped; raises `NonFiniteLossError` on the `max_consecutive`-th in a row."""
        self.consecutive += 1
        self.skipped += 1
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                stop_message(self.consecutive, self.skipped, step, self.last_good_checkpoint)
            )
