"""LARS: SGD with momentum and a layer-wise trust ratio, for large-batch training (CoKe, BYOL, ...).

With batches of a thousand images and more, one global lr is too large for some layers and too
small for others; LARS rescales each tensor's update by eta * ||w|| / ||g + wd w|| so that every
layer moves by about the same relative amount. The update follows CoKe's `coke/optimizer.py`:

    d  = g + wd * w                                  (decayed tensors only)
    d *= eta * ||w|| / ||d||   if ||w|| > 0 and ||d|| > 0, else 1
    mu = momentum * mu + d
    w -= lr * mu

The official code skips weight decay and the trust ratio for tensors with ndim <= 1; here the
choice is per group (`lars_exclude`), which the optimizer factory sets on the group of biases and
1-D tensors so that the same split drives the weight-decay schedule and the adaptation.

Like torch's fused optimizers, a step skips itself when `optimizer.found_inf` (a 0-dim float tensor
on the parameters' device) holds 1: weights and momentum stay as they were, decided on the device
so that the training step never waits for the GPU to know whether its gradients were finite.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling on top of heavy-ball momentum (no dampening, no Nesterov).

    Group keys: lr, momentum, weight_decay, trust_coefficient (eta) and `lars_exclude`, which turns
    off both the weight decay and the trust ratio for that group (plain SGD with momentum there).
    """

    skips_on_found_inf = True  # `step` honours `self.found_inf` on the device (see the module docstring)

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.0,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_exclude: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"invalid lr {lr}; must be >= 0")
        if momentum < 0.0:
            raise ValueError(f"invalid momentum {momentum}; must be >= 0")
        if weight_decay < 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}; must be >= 0")
        if trust_coefficient <= 0.0:
            raise ValueError(f"invalid trust_coefficient {trust_coefficient}; must be > 0")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "lars_exclude": lars_exclude,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One update of every parameter with a gradient; `closure` re-evaluates the loss (Lightning)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            # foreach kernels want one device and dtype per list.
            buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                self._update(params, group, found_inf)
        return loss

    def _update(
        self, params: list[torch.Tensor], group: dict[str, Any], found_inf: torch.Tensor | None = None
    ) -> None:
        """The update of one group's tensors that share a device and dtype; skipped if `found_inf`."""
        grads = [p.grad for p in params]
        if group["lars_exclude"]:
            updates = grads
        else:
            wd = group["weight_decay"]
            # A new list either way: the gradients themselves are left untouched.
            updates = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
            param_norms = torch.stack(torch._foreach_norm(params))
            update_norms = torch.stack(torch._foreach_norm(updates))
            one = torch.ones_like(param_norms)
            # Division first, then `where`: a zero norm gives inf / nan that is never selected.
            ratio = group["trust_coefficient"] * param_norms / update_norms
            ratio = torch.where((param_norms > 0) & (update_norms > 0), ratio, one)
            updates = torch._foreach_mul(updates, list(ratio.unbind()))

        buffers = []
        for p in params:
            state = self.state[p]
            if "mu" not in state:
                state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buffers.append(state["mu"])
        if found_inf is None:
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, updates)
            torch._foreach_add_(params, buffers, alpha=-group["lr"])
            return
        # Gated on the device: a skipped step adds no (non-finite) update, keeps mu (factor 1) and
        # moves the weights by lr * 0 * mu. An applied one computes exactly the ungated update.
        keep = found_inf.to(params[0].device) == 0
        updates = [torch.where(keep, u, 0.0) for u in updates]
        dtype = params[0].dtype
        torch._foreach_mul_(buffers, torch.where(keep, group["momentum"], 1.0).to(dtype))
        torch._foreach_add_(buffers, updates)
        torch._foreach_add_(params, torch._foreach_mul(buffers, keep.to(dtype)), alpha=-group["lr"])
