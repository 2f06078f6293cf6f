"""SSLModule: one backbone, a weighted set of objectives, an optional shared EMA teacher.

Generic on purpose: it knows nothing method-specific. It sums the objectives' weighted losses,
owns the optimizer and the per-step lr / weight-decay / EMA-momentum schedules, clips gradients,
updates the teacher once per optimizer step (so gradient accumulation is handled), and logs the
objectives' metrics under their own names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.objectives.base import IncompatibleConfigError, Objective, StepContext, TeacherSpec
from ssl.optim.clipping import clip_gradients
from ssl.optim.factory import build_optimizer, default_no_weight_decay, split_weight_decay
from ssl.optim.schedules import LR_SCHEDULES, cosine_schedule, frozen_then, momentum_schedule
from ssl.sharding import average_replicated_gradients, is_sharded, shard_blocks
from ssl.teacher import EMATeacher


def lr_schedule(cfg: Any) -> Any:
    """`optimizer.lr_schedule`: cosine (DINO, MAE) or timm_cosine (MFM); unknown names list both."""
    name = cfg.get("lr_schedule", "cosine")
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown optimizer.lr_schedule '{name}'; valid: {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[name]


def shared_teacher_spec(objectives: Mapping[str, Objective]) -> TeacherSpec | None:
    """The one teacher behaviour all teacher-based objectives agree on (or a clear error)."""
    specs = {name: obj.teacher_spec() for name, obj in objectives.items() if obj.needs_teacher}
    if not specs:
        return None
    distinct = set(specs.values())
    if len(distinct) > 1:
        raise IncompatibleConfigError(
            "objectives share one EMA teacher but ask for different teacher settings: "
            + "; ".join(f"{n}: {s}" for n, s in specs.items())
            + ". Set the same objective.<name>.teacher.* values for all of them."
        )
    return distinct.pop()


class SSLModule(pl.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        objectives: Mapping[str, Objective],
        weights: Mapping[str, float],
        optimizer: Any,
        batch_size: int,
        config: dict | None = None,
    ) -> None:
        super().__init__()
        if config is not None:
            self.save_hyperparameters({"config": config})
        self.backbone = backbone
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights = dict(weights)
        self.optim_cfg = optimizer
        self.batch_size = batch_size
        for objective in self.objectives.values():
            objective.check_backbone(backbone)
            objective.prepare_backbone(backbone)
        spec = shared_teacher_spec(self.objectives)
        self.teacher = EMATeacher(self.mirrored_by_teacher(), spec) if spec else None
        self.schedules: dict[str, np.ndarray] = {}
        self.sharded = False

    def configure_model(self) -> None:
        """`trainer.strategy=fsdp` (a device mesh from Lightning): shard the ViT blocks with FSDP2."""
        if self.device_mesh is None or self.sharded:
            return
        backbones = [self.backbone] + ([self.teacher["backbone"]] if self.teacher is not None else [])
        shard_blocks(backbones, self.device_mesh, root=self)
        self.sharded = True

    def mirrored_by_teacher(self) -> nn.ModuleDict:
        """The student parts the teacher averages: backbone plus heads objectives ask for."""
        parts: dict[str, nn.Module] = {"backbone": self.backbone}
        for name, objective in self.objectives.items():
            head = objective.teacher_heads() if objective.needs_teacher else None
            if head is not None:
                parts[name] = head
        return nn.ModuleDict(parts)

    # ----------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> torch.optim.Optimizer:
        objectives = list(self.objectives.values())

        def backbone_exempt(name: str, param: nn.Parameter) -> bool:
            return default_no_weight_decay(name, param) or any(
                o.backbone_no_weight_decay(name, param) for o in objectives
            )

        named = [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        groups = split_weight_decay(named, backbone_exempt)
        for objective in self.objectives.values():
            groups += split_weight_decay(objective.named_parameters(), objective.no_weight_decay)
        if self.sharded:  # optimizers' foreach kernels take sharded or plain tensors, not a mix
            groups = [
                {**g, "params": [p for p in g["params"] if is_sharded(p) == sharded]}
                for g in groups for sharded in (True, False)
            ]
        groups = [g for g in groups if g["params"]]
        return build_optimizer(groups, self.optim_cfg)

    def global_batch_size(self) -> int:
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        world = self.trainer.world_size if self._trainer else 1
        return self.batch_size * world * accumulate

    def build_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step lr, weight decay and teacher momentum.

        `frozen_epochs` (CoKe) keep lr at 0 first; warm-up and decay follow over the rest.

        lr = base lr x global batch / lr_reference_batch (256 for DINO and MAE, 512 for MFM);
        MFM's recipe also scales its min and warm-up start lr (`scale_min_lr_with_batch`).
        """
        cfg = self.optim_cfg
        scale = self.global_batch_size() / cfg.get("lr_reference_batch", 256)
        lr = cfg.lr * (scale if cfg.scale_lr_with_batch else 1.0)
        low_scale = scale if cfg.get("scale_min_lr_with_batch", False) else 1.0
        min_lr, warmup_start = cfg.min_lr * low_scale, cfg.get("warmup_start_lr", 0.0) * low_scale
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        # CoKe's bootstrap epoch(s): lr 0 while labels and centres are initialised.
        frozen = min(int(round(cfg.get("frozen_epochs", 0) * steps_per_epoch)), total_steps)
        lrs = lr_schedule(cfg)(lr, min_lr, total_steps - frozen, warmup, warmup_start)
        schedules = {
            "lr": frozen_then(frozen, lrs),
            "weight_decay": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        }
        if self.teacher is not None:
            spec = self.teacher.spec
            schedules["momentum"] = momentum_schedule(
                spec.schedule, spec.momentum, spec.momentum_end, total_steps, spec.ramp_steps
            )
        return schedules

    def on_train_start(self) -> None:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        batches = self.trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        if not math.isfinite(batches):
            steps_per_epoch = total
        self.schedules = self.build_schedules(total, steps_per_epoch)

    def scheduled(self, name: str) -> float:
        values = self.schedules[name]
        return float(values[min(self.global_step, len(values) - 1)])

    def context(self) -> StepContext:
        return StepContext(
            epoch=self.current_epoch, step=self.global_step,
            max_epochs=self.trainer.max_epochs if self._trainer else 1,
        )

    # ----------------------------------------------------------------------------- step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.teacher is not None:
            self.teacher.follow_mode_policy(self.backbone.training)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        ctx = self.context()
        teacher = self.teacher.module if self.teacher is not None else None
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            out = objective.loss(batch, self.backbone, teacher, ctx)
            total = total + self.weights.get(name, 1.0) * out.loss
            logs[f"{name}/loss"] = out.loss.detach()
            for key, value in out.metrics.items():
                logs[f"{name}/{key}"] = value
        batch_size = len(batch["index"])
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        if self.schedules:
            self.log("train/lr", self.scheduled("lr"), prog_bar=True, batch_size=batch_size)
            self.log("train/weight_decay", self.scheduled("weight_decay"), batch_size=batch_size)
            if "momentum" in self.schedules:
                self.log("train/teacher_momentum", self.scheduled("momentum"), batch_size=batch_size)
        return total

    def on_train_epoch_end(self) -> None:
        """Objectives' end-of-epoch updates; Lightning writes the epoch's checkpoint after this."""
        ctx = self.context()
        for name, objective in self.objectives.items():
            for key, value in objective.on_train_epoch_end(ctx).items():
                self.log(f"train/{name}/{key}", value, on_epoch=True, on_step=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Clip (DINO: per parameter, after AMP unscaling), then objective hooks (DINO freeze)."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:  # FSDP2 reduced the blocks' gradients; the replicated rest is averaged here
            average_replicated_gradients(params)
        clip_gradients(params, self.optim_cfg.clip_grad, self.optim_cfg.clip_mode)
        ctx = self.context()
        for objective in self.objectives.values():
            objective.before_optimizer_step(ctx)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Set this step's lr / wd, step, then move the teacher (once per optimizer step)."""
        if self.schedules:
            lr, wd = self.scheduled("lr"), self.scheduled("weight_decay")
            for group in optimizer.param_groups:
                group["lr"] = lr
                if group.get("apply_weight_decay"):
                    group["weight_decay"] = wd
        optimizer.step(closure=optimizer_closure)
        if self.teacher is not None:
            momentum = self.scheduled("momentum") if self.schedules else self.teacher.spec.momentum
            self.teacher.update(self.mirrored_by_teacher(), momentum)

    def eval_backbone(self, which: str = "teacher") -> Backbone:
        """The backbone evaluations use: the teacher's when there is one (DINO's protocol)."""
        if which == "teacher" and self.teacher is not None:
            return self.teacher["backbone"]
        return self.backbone
