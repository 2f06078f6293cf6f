"""Supervised: cross-entropy on the labelled images of a batch, beside any self-supervised objective.

For the usual real case, a few labelled images among many unlabelled ones, `objective=[dino,
supervised]` trains one backbone on both: the self-supervised loss on every image, this loss
on the labelled ones only (label -1 marks the others; ssl/losses/supervised.py masks them per
sample, without a host sync, normalised by the labelled count of all ranks). The classifier
reads the backbone's global vector of the first global crop; beside DINO that is a slice of
DINO's own student pass (shared through `ctx.forwards`), and the crops follow DINO's recipe.

From the command line: `python -m ssl.pretrain objective=[dino,supervised]
dataset.labelled_per_class=10 data.labelled_per_batch=16`. In Python, one step's loss:

>>> import torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> sup = Supervised(vit.embed_dim, **recipe_settings("supervised", num_classes=10))
>>> batch = {VIEWS: [torch.randn(4, 3, 32, 32)], LABEL: torch.tensor([3, -1, -1, 7])}
>>> out = sup.loss(batch, vit, None, StepContext())
>>> int(out.metrics["labelled"])
2
>>> out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.multicrop import encode_crops
from ssl.data.spec import LABEL, VIEWS, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.classifier import classifier_head
from ssl.losses.supervised import labelled_accuracy, masked_cross_entropy
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext


class Supervised(Objective):
    name = "supervised"
    needs_labels = True

    def __init__(
        self,
        embed_dim: int,
        *,
        num_classes: int | None,
        head: str,
        hidden_dim: int,
        label_smoothing: float,
    ) -> None:
        """Settings and their defaults: conf/objective/supervised.yaml."""
        super().__init__()
        if num_classes is None or int(num_classes) < 2:
            raise IncompatibleConfigError(
                f"objective.supervised.num_classes={num_classes}: the supervised loss needs the class "
                "count; use a labelled dataset (class folders for imagefolder), or set "
                "dataset.num_classes=<N> (or objective.supervised.num_classes=<N>)"
            )
        if not 0.0 <= float(label_smoothing) < 1.0:
            raise IncompatibleConfigError(
                f"objective.supervised.label_smoothing={label_smoothing}: use a value in [0, 1)"
            )
        self.num_classes = int(num_classes)
        self.head = classifier_head(embed_dim, self.num_classes, head, int(hidden_dim))
        self.label_smoothing = float(label_smoothing)

    @classmethod
    def backbone_inputs(cls, backbone: Backbone) -> tuple[int]:
        return (backbone.embed_dim,)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(global_crops=1, any_crop_recipe=True)

    def pooled_feature_heads(self) -> nn.Module:
        return self.head

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        crops = batch[VIEWS]
        # Keyed like DINO's student pass over all the crops, so a combination encodes them once.
        features = ctx.forwards.get_or_compute(
            backbone, crops, "encode_crops", lambda: encode_crops(backbone, crops)
        )
        labels = batch[LABEL].to(device=features.device, dtype=torch.long)
        logits = self.head(features[: crops[0].shape[0]])
        loss = masked_cross_entropy(logits, labels, self.label_smoothing)
        metrics = {
            "accuracy": labelled_accuracy(logits.detach(), labels),
            "labelled": (labels >= 0).sum().float(),
        }
        return ObjectiveOutput(loss, metrics)
