"""StepGate: whether each optimizer step is applied, decided without a host sync where possible.

The training module only reports what it sees (each micro-batch's loss, the gradients before the
step) and asks the gate; the gate owns the non-finite / AMP skipping that used to be spread over
the module's hooks. Two paths:

- device path: an optimizer that skips itself on the device (`skips_on_device`: torch's fused
  AdamW / SGD, LARS) and no fp16 GradScaler. The decision never reaches the host: the optimizer
  gets it as `found_inf` for this step only, the teacher as a gated EMA weight (`device_skip`),
  and the counters stay on the device (`DeviceCounters`) until the host reads them (`state` /
  `read`): every `trainer.log_every_n_steps` steps, before each checkpoint save and at train end.
  Clipping and the pre-step hooks run on every step (clipping non-finite gradients is harmless
  when the update is gated).
- host path (fp16: the GradScaler sets `found_inf` itself and already syncs; other optimizers):
  the flags are read at once, one sync per step, and a skipped step has its gradients dropped:
  the optimizers step no parameter without a gradient, so weights, moments and step counts stay
  as they were (`host_skipped` keeps the teacher put).

The counting and the stop after too many consecutive skips are `NonFiniteGuard` / `DeviceCounters`
(ssl/optim/nonfinite.py); this object applies them to one optimizer step after another.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ssl.distributed import all_reduce_sum
from ssl.optim.factory import skips_on_device
from ssl.optim.nonfinite import DeviceCounters, NonFiniteGuard, all_finite


class StepGate:
    """Non-finite / AMP step skipping for one optimizer, one step at a time.

    Per optimizer step: `observe_loss` for each micro-batch, `unscale` then `decide` once the
    gradients are ready (before clipping), `step` to run the optimizer, then `host_skipped` /
    `device_skip` for the teacher update and `count_step` to know when the host should `read`.
    `max_consecutive` skipped steps in a row raise `NonFiniteLossError` (0 or None: never).
    """

    def __init__(self, max_consecutive: int | None = 20) -> None:
        self.guard = NonFiniteGuard(max_consecutive)
        self.counters: DeviceCounters | None = None  # when the skip is decided on the device
        self.host_skipped = False  # this step was skipped, decided on the host
        self.device_skip: torch.Tensor | None = None  # this step's skip, decided on the device
        self._loss_finite: torch.Tensor | None = None  # over this optimizer step's micro-batches
        self._found_inf_on: torch.optim.Optimizer | None = None
        self._weights_from: str | None = None  # the newest checkpoint when this step started
        self._steps_since_read = 0

    def observe_loss(self, loss: torch.Tensor) -> None:
        """Record whether one micro-batch's loss is finite (on the device: no sync)."""
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    @staticmethod
    def unscale(optimizer: torch.optim.Optimizer, scaler: Any) -> None:
        """fp16: have the GradScaler unscale the gradients before they are checked or clipped.

        Lightning unscales before `on_before_optimizer_step`, except for optimizers that unscale
        inside their own step (the fused AdamW of ssl.optim.factory): their gradients would be
        clipped while still multiplied by the loss scale. Unscaling here also records the scaler's
        inf check, so its `step` skips an overflow and its `update` lowers the scale as usual.
        """
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)

    def flags(self, params: Sequence[torch.nn.Parameter], device: torch.device) -> torch.Tensor:
        """[loss not finite, gradients not finite] of this optimizer step, summed over ranks so that
        all of them decide alike; on the device, no host sync. Forgets the observed losses."""
        loss_ok = self._loss_finite
        if loss_ok is None:
            loss_ok = torch.ones((), dtype=torch.bool, device=device)
        self._loss_finite = None
        grads_ok = all_finite((p.grad for p in params), device=device)
        flags = torch.stack([~loss_ok.to(device), ~grads_ok.to(device)]).float()
        return all_reduce_sum(flags)

    def decide(
        self,
        optimizer: torch.optim.Optimizer,
        params: Sequence[torch.nn.Parameter],
        step: int,
        device: torch.device,
        scaler: Any = None,
        checkpoint: str | None = None,
    ) -> bool:
        """Decide whether this step is applied; True: clip and run the pre-step hooks now.

        `scaler`: the fp16 GradScaler, or None; `checkpoint`: the newest one on disk (the weights
        an applied step trains on). Device path: sets `optimizer.found_inf` and `device_skip`,
        updates the device counters and always returns True. Host path: one sync; a skipped step
        has its gradients dropped and returns False; raises `NonFiniteLossError` past the limit.
        """
        self._weights_from = checkpoint
        if scaler is None and skips_on_device(optimizer):
            bad = self.flags(params, device).sum() > 0
            optimizer.found_inf = bad.float()  # what torch's fused optimizers read (0-dim float32)
            self._found_inf_on, self.device_skip = optimizer, bad
            if self.counters is None:
                self.counters = DeviceCounters(bad.device)
            self.counters.update(bad, step, self.guard.max_consecutive)
            return True
        if self.host_step_is_finite(params, step, device, scaler):
            self.guard.good(checkpoint)
            return True
        self.host_skipped = True
        for param in params:
            param.grad = None
        return False

    def host_step_is_finite(
        self, params: Sequence[torch.nn.Parameter], step: int, device: torch.device, scaler: Any = None
    ) -> bool:
        """Whether this optimizer step's losses and gradients are finite on every rank (host path).

        One host sync per optimizer step. Under an fp16 GradScaler, inf gradients with a finite
        loss are the scaler's overflows (it skips them and lowers its scale): counted apart, never
        a reason to stop. Raises `NonFiniteLossError` after too many consecutive failures.
        """
        bad_loss, bad_grads = (bool(v) for v in self.flags(params, device).tolist())
        if not (bad_loss or bad_grads):
            return True
        if bad_grads and not bad_loss and scaler is not None:
            self.guard.overflow()
        else:
            self.guard.bad(step)
        return False

    def metrics(self) -> dict[str, torch.Tensor | float]:
        """This step's counters to log: device tensors on the device path (no sync), else floats."""
        if self.device_skip is not None and self.counters is not None:
            return {
                "train/nonfinite_skipped": self.counters.skipped.float(),
                "train/nonfinite_consecutive": self.counters.consecutive.float(),
            }
        logs: dict[str, torch.Tensor | float] = {
            "train/nonfinite_skipped": float(self.guard.skipped),
            "train/nonfinite_consecutive": float(self.guard.consecutive),
        }
        if self.guard.overflows:
            logs["train/amp_overflow_skipped"] = float(self.guard.overflows)
        return logs

    def step(self, optimizer: Any, closure: Callable[[], Any] | None = None) -> None:
        """Run `optimizer.step(closure)` (the closure reaches `decide`); `found_inf` lasts one step."""
        self.host_skipped, self.device_skip = False, None
        try:
            optimizer.step(closure=closure)
        finally:
            if self._found_inf_on is not None:
                del self._found_inf_on.found_inf
                self._found_inf_on = None

    def count_step(self, interval: int) -> bool:
        """Count an optimizer step; True when `interval` steps passed since the last `read`."""
        self._steps_since_read += 1
        return self._steps_since_read >= interval

    def state(self) -> torch.Tensor | None:
        """The device counters as one float64 vector for the host's copy, or None (host path)."""
        return self.counters.values() if self.counters is not None else None

    def read(self, values: Sequence[float] = ()) -> None:
        """Take the host copy of `state()` into the guard; raise `NonFiniteLossError` past the limit.

        The caller copies `state()` (with anything else it reads then) in one transfer, so that the
        steps between two reads have no sync. The steps since the last read started from
        `checkpoint` given to `decide`: a good step among them makes it the last good checkpoint.
        """
        self._steps_since_read = 0
        if self.counters is not None:
            self.counters.apply(list(values), self.guard, self._weights_from)
