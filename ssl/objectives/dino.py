"""DINO (Caron et al., 2021): self-distillation with a centred, sharpened EMA teacher.

Faithful to facebookresearch/dino: the teacher sees only the global crops, the loss averages
every (teacher global, other student crop) pair, the centre is updated after the loss from the
all-reduced teacher logits, the teacher temperature warms up per epoch, and the prototype layer
is frozen during the first `freeze_last_layer` epochs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.multicrop import encode_crops
from ssl.data.spec import ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.dino import DINOHead
from ssl.losses.dino import dino_loss_from_probs, teacher_probabilities, updated_center
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext
from ssl.optim.schedules import warmup_constant_schedule
from ssl.teacher import TeacherSpec


class DINO(Objective):
    name = "dino"
    needs_teacher = True
    recipe_drop_path_rate = 0.1

    def __init__(
        self,
        embed_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
        freeze_last_layer: int = 1,
        global_crops: int = 2,
        local_crops: int = 8,
        teacher_momentum: float = 0.996,
        teacher_momentum_end: float = 1.0,
    ) -> None:
        super().__init__()
        if global_crops < 1:
            raise IncompatibleConfigError("DINO needs at least one global crop (global_crops >= 1).")
        if global_crops + local_crops < 2:
            raise IncompatibleConfigError(
                "DINO compares a teacher crop with a *different* student crop: use "
                "global_crops >= 2 or local_crops >= 1."
            )
        self.head = DINOHead(
            embed_dim, out_dim, hidden_dim, bottleneck_dim, use_bn=use_bn_in_head,
            norm_last_layer=norm_last_layer,
        )
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.freeze_last_layer = freeze_last_layer
        self.global_crops = global_crops
        self.local_crops = local_crops
        self._teacher = TeacherSpec(teacher_momentum, teacher_momentum_end, train_mode=True)

    @classmethod
    def from_config(cls, cfg: Any, backbone: Backbone) -> DINO:
        return cls(
            backbone.embed_dim,
            out_dim=cfg.out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            use_bn_in_head=cfg.use_bn_in_head,
            norm_last_layer=cfg.norm_last_layer,
            student_temp=cfg.student_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs,
            center_momentum=cfg.center_momentum,
            freeze_last_layer=cfg.freeze_last_layer,
            global_crops=cfg.global_crops,
            local_crops=cfg.local_crops,
            teacher_momentum=cfg.teacher.momentum,
            teacher_momentum_end=cfg.teacher.momentum_end,
        )

    def view_spec(self) -> ViewSpec:
        return ViewSpec(self.global_crops, self.local_crops)

    def teacher_spec(self) -> TeacherSpec:
        return self._teacher

    def teacher_heads(self) -> nn.Module:
        return self.head

    def sharded_blocks(self) -> list[nn.Module]:
        """The head's MLP and its 65536-way last layer (ViT-B recipe: 23M parameters) shard under FSDP."""
        return [self.head.mlp, self.head.last_layer]

    def teacher_temperature(self, epoch: int) -> float:
        """linspace(warmup, final, warmup_epochs) then constant, indexed by epoch."""
        schedule = warmup_constant_schedule(
            self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs,
            max(epoch + 1, self.warmup_teacher_temp_epochs),
        )
        return float(schedule[epoch])

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Drop the prototype layer's gradients during the first epochs (AdamW then skips it)."""
        if ctx.epoch < self.freeze_last_layer:
            for param in self.head.last_layer.parameters():
                param.grad = None

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        crops = batch["views"]
        n_global = self.global_crops
        # Shared with any other objective of the combination encoding the same crops.
        student_features = ctx.forwards.get_or_compute(
            backbone, crops, "encode_crops", lambda: encode_crops(backbone, crops)
        )
        student_logits = self.head(student_features)
        with torch.no_grad():
            teacher_features = ctx.forwards.get_or_compute(
                teacher["backbone"], crops[:n_global], "encode_crops",
                lambda: encode_crops(teacher["backbone"], crops[:n_global]),
            )
            teacher_logits = teacher[self.name](teacher_features)
        temp = self.teacher_temperature(ctx.epoch)
        probs = teacher_probabilities(teacher_logits, self.center, temp)
        loss = dino_loss_from_probs(student_logits, probs, len(crops), self.student_temp)
        with torch.no_grad():
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1).mean()
            b = crops[0].shape[0]
            feature_std = F.normalize(student_features[:b].float(), dim=-1).std(dim=0).mean()
            # A non-finite teacher output (a corrupt batch on any rank: the sum is all-reduced)
            # would poison the centre for good; keep the old one then (no host sync).
            center = updated_center(self.center, teacher_logits, self.center_momentum)
            self.center.copy_(torch.where(torch.isfinite(center).all(), center, self.center))
        metrics = {
            "teacher_temp": torch.tensor(temp),
            "teacher_entropy": entropy,
            "feature_std": feature_std,
            "center_norm": self.center.norm(),
        }
        return ObjectiveOutput(loss, metrics)
