"""Optimizer from config, with the regularised / not-regularised parameter split."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from ssl.optim.lars import LARS

OPTIMIZERS = ("adamw", "sgd", "lars")


def default_no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """DINO's `get_params_groups` rule: biases and 1-D tensors (norms) are not decayed.

    cls_token and pos_embed (3-D) are decayed, as in the official code.
    """
    return param.ndim < 2 or name.endswith(".bias")


def split_weight_decay(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    exempt: Callable[[str, torch.nn.Parameter], bool],
) -> list[dict]:
    """Two groups: decayed (`apply_weight_decay=True`) and exempt (biases, norms, ...).

    Frozen parameters are left out. The schedule later writes lr into both groups and the
    weight-decay schedule into the decayed one only.
    """
    decayed, plain = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        (plain if exempt(name, param) else decayed).append(param)
    return [
        {"params": decayed, "apply_weight_decay": True},
        {"params": plain, "apply_weight_decay": False, "weight_decay": 0.0},
    ]


class FusedSGD(torch.optim.SGD):
    """torch's fused SGD with a zero momentum buffer for every parameter from the start.

    The fused kernel allocates its buffers uninitialised on the first step and fills them from that
    step's gradients: a first step skipped through `found_inf` would leave them garbage, and a
    parameter whose first gradient comes later (DINO's frozen last layer) makes the kernel fail. A
    zero buffer gives the same first update (momentum x 0 + g = g).
    """

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, fused=True, **kwargs)
        self.zero_missing_buffers()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.zero_missing_buffers()

    def zero_missing_buffers(self) -> None:
        for group in self.param_groups:
            if not group["momentum"]:
                continue
            for p in group["params"]:
                state = self.state[p]
                if state.get("momentum_buffer") is None:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def can_fuse(groups: list[dict]) -> bool:
    """Whether torch's fused kernels take every parameter (floating point, on CPU or CUDA)."""
    params = [p for g in groups for p in g["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step` skips its whole update (state and step counts included) when
    `optimizer.found_inf` holds 1, read on the device: torch's fused Adam / AdamW / SGD, and LARS."""
    if getattr(optimizer, "skips_on_found_inf", False):
        return True
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)):
        return all(group.get("fused") for group in optimizer.param_groups)
    return False


def build_optimizer(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """AdamW (ViT recipes), SGD with momentum (convnet recipes) or LARS (CoKe's large batches).

    lr and weight decay start at 0: the training module writes them into the groups every step.
    The fused kernels (CPU and CUDA) update every tensor in one pass, and skip a non-finite step on
    the device (`found_inf`); they are used whenever every parameter allows it.
    """
    name = cfg.name
    fused = can_fuse(groups)
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=0.0, betas=tuple(cfg.betas), weight_decay=0.0, fused=fused or None
        )
    if name == "sgd":
        if fused:
            return FusedSGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=0.0)
        return torch.optim.SGD(groups, lr=0.0, momentum=cfg.momentum, weight_decay=0.0)
    if name == "lars":
        # The group exempt from weight decay (biases, 1-D tensors) also skips the trust ratio,
        # as CoKe's LARS does for every tensor with ndim <= 1.
        lars_groups = [{**g, "lars_exclude": not g.get("apply_weight_decay", True)} for g in groups]
        return LARS(
            lars_groups,
            lr=0.0,
            momentum=cfg.momentum,
            weight_decay=0.0,
            trust_coefficient=cfg.get("trust_coefficient", 0.001),
        )
    raise ValueError(f"unknown optimizer '{name}'; valid: {', '.join(OPTIMIZERS)}")
