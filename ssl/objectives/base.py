"""The Objective protocol: what every pretraining objective declares and computes.

An objective is an `nn.Module` holding its own heads and state (buffers travel with checkpoints
and DDP). The training module knows nothing method-specific: it asks each objective for the views
it needs, whether it needs the shared EMA teacher (and which of its heads the teacher mirrors),
and calls `loss` with the batch, the student backbone and the teacher.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.objectives.forward_cache import ForwardCache
from ssl.optim.factory import default_no_weight_decay


class IncompatibleConfigError(ValueError):
    """An objective cannot run with the chosen backbone or settings (raised before training)."""


@dataclass(frozen=True)
class ViewSpec:
    """Crops the data module must produce for an objective (sizes come from the dataset).

    global_crops / local_crops: multi-crop views, in `batch["views"]` (globals first), augmented
    per `crop_recipe` (a name in ssl.data.views.CROP_RECIPES: "dino", "coke", "coke_single_view").
    global_crop_scale / local_crop_scale: their RandomResizedCrop scales, for methods whose recipe
    fixes them (CoKe: 0.08-1); None takes the dataset's. All objectives that ask for global crops
    share one multi-crop pipeline, so they must agree on these three fields.
    plain_crops: RandomResizedCrop(scale=plain_crop_scale) + flip, the masked-image-modeling
    recipe (MAE, MFM), at the dataset's image size, in `batch["plain_views"]`; data2vec 1.0 adds
    ColorJitter(j, j, j) first (`plain_color_jitter`, 0 = none).
    """

    global_crops: int = 0
    local_crops: int = 0
    plain_crops: int = 0
    plain_crop_scale: tuple[float, float] = (0.2, 1.0)
    plain_color_jitter: float = 0.0
    crop_recipe: str = "dino"
    global_crop_scale: tuple[float, float] | None = None
    local_crop_scale: tuple[float, float] | None = None


@dataclass(frozen=True)
class TeacherSpec:
    """How the shared EMA teacher behaves for an objective.

    momentum -> momentum_end per optimizer step, following `schedule`: "cosine" over the run
    (DINO), "constant" (data2vec 1.0: momentum only) or "linear" over `ramp_steps` updates then
    constant (data2vec 2.0). `train_mode` says whether the teacher follows the student's
    train/eval mode (DINO) or always stays in eval mode (data2vec). `buffers`: "keep" (EMA over
    parameters only, as DINO) or "copy" (buffers copied each step).
    """

    momentum: float = 0.996
    momentum_end: float = 1.0
    train_mode: bool = True
    buffers: str = "keep"
    schedule: str = "cosine"
    ramp_steps: int = 0


@dataclass
class StepContext:
    """Where training stands; objectives read schedules from it instead of from Lightning.

    `forwards` memoises backbone passes within the step, so that objectives of a combination
    encoding the same view share one pass (ssl/objectives/forward_cache.py).
    """

    epoch: int = 0
    step: int = 0
    max_epochs: int = 1
    forwards: ForwardCache = field(default_factory=ForwardCache)


@dataclass
class ObjectiveOutput:
    loss: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


class BatchMasker(Protocol):
    """Draws per-sample masks for a batch in the data-loading collate step (see ssl/data)."""

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ...


@dataclass
class Reconstruction:
    """Images an objective reconstructs, for a user to look at (all [B, 3, H, W], normalised)."""

    original: torch.Tensor
    corrupted: torch.Tensor
    reconstruction: torch.Tensor


class Objective(nn.Module):
    """Base class. Subclasses set `name`, `needs_teacher` and implement `loss`."""

    name: str = "objective"
    needs_teacher: bool = False
    # Stochastic depth of the official recipe, used when backbone.drop_path_rate=auto (ViTs).
    recipe_drop_path_rate: float = 0.0
    # Whether the official recipe converts BatchNorm to SyncBatchNorm across GPUs
    # (used when trainer.sync_batchnorm is null).
    recipe_sync_batchnorm: bool = False

    def view_spec(self) -> ViewSpec:
        return ViewSpec()

    def teacher_spec(self) -> TeacherSpec | None:
        """Teacher behaviour, or None when the objective needs no teacher."""
        return None

    def teacher_heads(self) -> nn.Module | None:
        """The head(s) the EMA teacher mirrors besides the backbone (None: backbone only)."""
        return None

    def pooled_feature_heads(self) -> nn.Module | None:
        """The trainable head on the backbone's pooled features (CoKe's projector and predictor),
        when there is one. Part of the student's least work in `ssl.benchmark`: DINO's head comes
        in as a teacher head; heads on token grids (MAE, MFM) are not included there."""
        return self.teacher_heads()

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        """Raise `IncompatibleConfigError` with advice when the backbone cannot serve.

        Called before the objective is built, so that its heads never see a wrong backbone.
        """

    def prepare_backbone(self, backbone: Backbone) -> None:
        """Adjust the student backbone once, before the teacher copies it (MAE: fixed positions)."""

    def sharded_blocks(self) -> list[nn.Module]:
        """Head blocks `trainer.strategy=fsdp` may shard like the backbone's (each called by forward)."""
        return []

    def batch_maskers(self) -> list[BatchMasker]:
        """Mask generators the data module runs on every batch (their keys join the batch)."""
        return []

    def reconstruct(self, images: torch.Tensor, backbone: Backbone) -> Reconstruction | None:
        """Corrupt clean normalised images and reconstruct them (masked modeling), else None."""
        return None

    def no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        """Whether a parameter of this objective is exempt from weight decay (biases, norms)."""
        return default_no_weight_decay(name, param)

    def backbone_no_weight_decay(self, name: str, param: torch.nn.Parameter) -> bool:
        """Backbone parameters this objective's recipe also exempts (MFM: pos_embed, cls_token).

        Added to the default rule (biases and 1-D tensors), which DINO and MAE follow.
        """
        return False

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Called after backward and gradient clipping, before the optimizer step."""

    def on_train_epoch_end(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        """End-of-epoch state changes (CoKe: the epoch's centres become the classifier).

        Runs on every rank, after the epoch's last step and before its checkpoint is written.
        Returns metrics to log under the objective's name.
        """
        return {}

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        """Loss and metrics for one batch. `teacher` holds "backbone" and this objective's name."""
        raise NotImplementedError
