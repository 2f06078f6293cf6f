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


def build_optimizer(groups: list[dict], cfg: Any) -> torch.optim.Optimizer:
    """AdamW (ViT recipes), SGD with momentum (convnet recipes) or LARS (CoKe's large batches).

    lr and weight decay start at 0: the training module writes them into the groups every step.
    """
    name = cfg.name
    if name == "adamw":
        # The fused kernel (CPU and CUDA) updates every tensor in one pass: less overhead per step.
        params = [p for g in groups for p in g["params"]]
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.AdamW(
            groups, lr=0.0, betas=tuple(cfg.betas), weight_decay=0.0, fused=fused or None
        )
    if name == "sgd":
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
