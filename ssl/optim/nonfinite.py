"""Skip optimizer steps whose loss or gradients are not finite; stop after too many in a row.

One NaN batch (a corrupt image, a loss spike, an fp16 overflow) must not poison the weights, the
optimizer's moments or the EMA teacher: the step is skipped and counted. A run that keeps producing
them has diverged, so after `max_consecutive` skipped steps in a row it stops with advice and the
last checkpoint written while training was still healthy, instead of spending hours on NaNs.

The bookkeeping here is pure Python; `SSLModule` computes the flags and applies the decision.

Without a host sync (`DeviceCounters`): an optimizer that skips itself on the device (torch's fused
AdamW / SGD and LARS read `optimizer.found_inf`) lets the whole decision stay on the GPU. The counters
then live on the device too and the host reads them lazily (every `trainer.log_every_n_steps` steps,
before every checkpoint save and at the end of training): one sync every N steps instead of one per
step. What that changes: the run stops at the first read after the limit was reached, not at the
step that reached it (the message still names that step and its counts), and the steps in between
still train when their gradients are finite. The last good checkpoint stays exact because every
save reads first.
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


def all_finite(tensors: Iterable[torch.Tensor | None], device: torch.device | None = None) -> torch.Tensor:
    """0-dim bool tensor: every element of every tensor is finite (no host sync; one fused norm).

    FSDP-sharded tensors are checked on this rank's shard; callers combine the ranks' answers.
    `device`: where the answer for no tensors at all is made (no host-to-device copy later).
    """
    present = [local(t.detach()) for t in tensors if t is not None]
    if not present:
        return torch.ones((), dtype=torch.bool, device=device)
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
    longest: int = 0  # the longest run of skipped steps seen (kept by the device counters)

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
        self.longest = max(self.longest, self.consecutive)
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                stop_message(self.consecutive, self.skipped, step, self.last_good_checkpoint)
            )


class DeviceCounters:
    """The guard's counters as device tensors, updated every step without a host sync.

    consecutive / skipped as in `NonFiniteGuard`; `longest`: the longest run of skipped steps so far;
    `hit_step` / `hit_skipped`: the step at which a run first reached the limit (-1: not yet) and the
    skipped total then; `applied`: whether a step was applied since the last read (before any hit).
    """

    FIELDS = ("consecutive", "skipped", "longest", "hit_step", "hit_skipped", "applied")

    def __init__(self, device: torch.device) -> None:
        for name in self.FIELDS:
            setattr(self, name, torch.zeros((), dtype=torch.long, device=device))
        self.hit_step.fill_(-1)

    @torch.no_grad()
    def update(self, bad: torch.Tensor, step: int, limit: int | None) -> None:
        """Count one optimizer step; `bad`: 0-dim bool tensor, True if it was skipped."""
        bad_int = bad.long()
        self.consecutive.add_(1).mul_(bad_int)
        self.skipped.add_(bad_int)
        torch.maximum(self.longest, self.consecutive, out=self.longest)
        before_hit = self.hit_step < 0
        if limit:
            hit = before_hit & (self.consecutive >= limit)
            self.hit_step.copy_(torch.where(hit, step, self.hit_step))
            self.hit_skipped.copy_(torch.where(hit, self.skipped, self.hit_skipped))
        self.applied.copy_(torch.where(before_hit & ~bad, 1, self.applied))

    def values(self) -> torch.Tensor:
        """All counters as one float64 vector, to read with a single copy (exact below 2**53)."""
        return torch.stack([getattr(self, name) for name in self.FIELDS]).double()

    def apply(self, values: list[float], guard: NonFiniteGuard, checkpoint: str | None) -> None:
        """Copy values read from `values()` into `guard`; raise `NonFiniteLossError` past the limit.

        `checkpoint`: the newest checkpoint the steps since the last read started from (the weights
        an applied step among them trained on).
        """
        consecutive, skipped, longest, hit_step, hit_skipped, applied = (int(v) for v in values)
        self.applied.zero_()
        if applied:
            guard.good(checkpoint)
        guard.consecutive, guard.skipped = consecutive, skipped
        guard.longest = max(guard.longest, longest)
        if hit_step >= 0:
            raise NonFiniteLossError(
                stop_message(guard.max_consecutive or 0, hit_skipped, hit_step, guard.last_good_checkpoint)
            )
