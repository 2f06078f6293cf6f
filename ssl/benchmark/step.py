"""One training step as Lightning drives it, on a synthetic batch of the configured crops."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from omegaconf import DictConfig

from ssl.data.datamodule import merge_view_specs
from ssl.data.datasets import build_dataset
from ssl.data.spec import PLAIN_VIEWS, VIEWS
from ssl.module import SSLModule

PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dataset_size(cfg: DictConfig) -> int:
    """`bench.num_samples`, else the configured dataset's size (CoKe's label memory), else ImageNet's."""
    if cfg.bench.get("num_samples"):
        return int(cfg.bench.num_samples)
    try:
        return len(build_dataset(cfg.dataset, "pretrain"))
    except (FileNotFoundError, ValueError):
        return 1_281_167


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: Any, device: torch.device) -> str:
    """"32", "bf16" or "fp16" for `bench.precision` on `device`; auto: bf16 on CUDA (what
    ssl.pretrain picks on GPUs that support it), float32 on the CPU."""
    name = str(precision).lower().removesuffix("-mixed").removesuffix("-true")
    name = {"auto": "bf16" if device.type == "cuda" else "32", "16": "fp16", "fp32": "32"}.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"bench.precision={precision}: valid values are auto, 32, bf16, fp16")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            "bench.precision=fp16 needs a CUDA device: CPU autocast in float16 is not what any "
            "training run uses. Use bench.precision=32 or bf16 on the CPU."
        )
    return name


def synthetic_batch(cfg: DictConfig, module: SSLModule, device: torch.device) -> dict[str, Any]:
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    b, d = cfg.data.batch_size, cfg.dataset
    crops = [torch.randn(b, 3, d.image_size, d.image_size) for _ in range(views.global_crops)]
    crops += [torch.randn(b, 3, d.local_crop_size, d.local_crop_size) for _ in range(views.local_crops)]
    batch: dict[str, Any] = {"label": torch.zeros(b, dtype=torch.long), "index": torch.arange(b)}
    if crops:
        batch[VIEWS] = crops
    if views.plain_crops:
        size = (b, 3, d.image_size, d.image_size)
        batch[PLAIN_VIEWS] = [torch.randn(size) for _ in range(views.plain_crops)]
    for objective in module.objectives.values():
        for masker in objective.batch_maskers():
            batch.update(masker(b))
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}


def student_crops(batch: dict[str, Any]) -> list[torch.Tensor]:
    return list(batch.get(VIEWS, [])) + list(batch.get(PLAIN_VIEWS, []))


class ScaledOptimizer:
    """What Lightning's 16-mixed plugin does around `optimizer.step(closure)`: run the closure
    (scaled backward, unscaling, the hooks), then let the GradScaler step (it skips overflows)
    and update its scale."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.scaler = scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self, closure: Callable[[], torch.Tensor]) -> None:
        closure()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def attach_grad_scaler(module: SSLModule, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler the module sees as its Trainer's (fp16): it unscales before the non-finite
    check and clipping, and counts the scaler's overflows apart from real failures."""
    scaler = torch.amp.GradScaler(device.type)
    module.grad_scaler = lambda: scaler
    return scaler


def training_step(
    module: SSLModule,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One optimizer step as Lightning drives it: closure (forward, backward, guard, clipping), the
    step, the EMA; under autocast to `dtype` when given, with `scaler`'s loss scaling (fp16)."""
    device_type = next(module.parameters()).device.type

    def closure() -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # the fused AdamW unscales in its own step (SSLModule does it)
        module.on_before_optimizer_step(optimizer)
        return loss

    module.optimizer_step(0, 0, ScaledOptimizer(optimizer, scaler) if scaler else optimizer, closure)
    optimizer.zero_grad(set_to_none=True)
