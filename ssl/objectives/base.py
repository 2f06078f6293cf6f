"""The Objective protocol: what every pretraining objective declares and computes.

An objective is an `nn.Module` holding its own heads and state (buffers travel with checkpoints
and DDP). The training module knows nothing method-specific: it asks each objective for the views
it needs, whether it needs the shared EMA teacher (and which of its heads the teacher mirrors),
and calls `loss` with the batch, the student backbone and the teacher.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ssl.backbones.base import Backbone
from ssl.data.spec import BatchMasker, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.objectives.forward_cache import ForwardCache
from ssl.optim.factory import default_no_weight_decay
from ssl.teacher import TeacherSpec

# Keys of an objective's config node that ssl/composite.py reads (loss weight, head optimiser).
COMPOSITE_KEYS = ("weight", "lr_scale", "weight_decay")


def settings_from_config(cls: type[Objective], cfg: Any) -> dict[str, Any]:
    """An objective's constructor settings from its config node (conf/objective/<name>.yaml).

    The yaml is the one place a setting and its default are written: the constructor takes each
    as a keyword-only parameter without a default, so a key missing on either side fails here.
    """
    values = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    values = {k: v for k, v in values.items() if k not in COMPOSITE_KEYS}
    names = cls.setting_names()
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise IncompatibleConfigError(
            f"unknown setting(s) objective.{cls.name}.{', '.join(unknown)}; valid: {', '.join(sorted(names))}"
            f" (and {', '.join(COMPOSITE_KEYS)})"
        )
    missing = [n for n in names if n not in values]
    if missing:
        raise IncompatibleConfigError(
            f"objective.{cls.name} is missing {', '.join(missing)}: conf/objective/{cls.name}.yaml declares "
            "every setting; compose the config from it"
        )
    return values


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
    # Whether the loss reads batch[LABEL] (negative: unlabelled); ssl.pretrain then refuses a
    # pretraining set without a labelled image.
    needs_labels: bool = False
    # Stochastic depth of the official recipe, used when backbone.drop_path_rate is null (ViTs).
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
    def setting_names(cls) -> list[str]:
        """The settings: the constructor's keyword-only parameters, one per key of its yaml."""
        params = inspect.signature(cls.__init__).parameters.values()
        return [p.name for p in params if p.kind is p.KEYWORD_ONLY]

    @classmethod
    def backbone_inputs(cls, backbone: Backbone) -> tuple[Any, ...]:
        """The constructor's positional inputs taken from the backbone (the backbone itself here)."""
        return (backbone,)

    @classmethod
    def from_config(cls, cfg: Any, backbone: Backbone) -> Objective:
        """Build from the `objective.<name>` config node for `backbone`."""
        return cls(*cls.backbone_inputs(backbone), **settings_from_config(cls, cfg))

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
