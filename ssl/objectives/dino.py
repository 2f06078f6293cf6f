"""DINO (Caron et al., 2021): self-distillation with a centred, sharpened EMA teacher.

Faithful to facebookresearch/dino: the teacher sees only the global crops, the loss averages
every (teacher global, other student crop) pair, the centre is updated after the loss from the
all-reduced teacher logits, the teacher temperature warms up per epoch, and the prototype layer
is frozen during the first `freeze_last_layer` epochs.

From the command line: `python -m ssl.pretrain experiment=quickstart`. In Python, one step's
loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> dino = DINO(vit.embed_dim, **recipe_settings("dino", out_dim=256, local_crops=2))
>>> teacher = nn.ModuleDict({"backbone": copy.deepcopy(vit), "dino": copy.deepcopy(dino.head)})
>>> crops = [torch.randn(4, 3, 32, 32)] * 2 + [torch.randn(4, 3, 16, 16)] * 2
>>> out = dino.loss({VIEWS: crops}, vit, teacher, StepContext())
>>> out.loss.isfinite().item()
True
>>> out.loss.backward()  # the training module then steps and moves the teacher by EMA
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.multicrop import encode_crops
from ssl.data.spec import VIEWS, CropRecipe, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.dino import DINOHead
from ssl.losses.dino import dino_loss_from_probs, teacher_probabilities, updated_center
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext
from ssl.optim.schedules import warmup_constant_schedule
from ssl.teacher import TeacherSpec

# DataAugmentationDINO, which is the data layer's standard multi-crop recipe.
DINO_CROPS = CropRecipe(name="dino")


class DINO(Objective):
    name = "dino"
    needs_teacher = True
    recipe_drop_path_rate = 0.1

    def __init__(
        self,
        embed_dim: int,
        *,
        out_dim: int,
        hidden_dim: int,
        bottleneck_dim: int,
        use_bn_in_head: bool,
        norm_last_layer: bool,
        student_temp: float,
        teacher_temp: float,
        warmup_teacher_temp: float,
        warmup_teacher_temp_epochs: int,
        center_momentum: float,
        freeze_last_layer: int,
        global_crops: int,
        local_crops: int,
        teacher: Mapping[str, Any],
    ) -> None:
        """Settings and their defaults: conf/objective/dino.yaml (`teacher`: momentum, momentum_end)."""
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
        momentum, momentum_end = float(teacher["momentum"]), float(teacher["momentum_end"])
        self._teacher = TeacherSpec(momentum, momentum_end, train_mode=True)

    @classmethod
    def backbone_inputs(cls, backbone: Backbone) -> tuple[int]:
        return (backbone.embed_dim,)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(self.global_crops, self.local_crops, crop_recipe=DINO_CROPS)

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
        crops = batch[VIEWS]
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
