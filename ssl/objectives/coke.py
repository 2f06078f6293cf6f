"""CoKe (Qian et al., CVPR 2022): online constrained k-means with cluster discrimination.

Faithful to idstcv/CoKe. The l2-normalised projections are clustered online by several heads
(K each) with dual variables enforcing a lower bound of `ratio` x the average cluster size; the
network classifies every image into the cluster it got in the *previous* epoch, against the
previous epoch's centres (a fixed classifier without gradient), with both its projection and its
predictor. Variants: one view (the released single-view recipe; optional stage-2 soft labels),
two views (alpha hard + (1 - alpha) cross-view soft targets) and multi-crop (two views + small
crops). All clustering state is updated from the all-gathered global batch on every rank.

From the command line: `python -m ssl.pretrain experiment=quickstart_coke`. In Python, one step's
loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> coke = CoKe(vit.embed_dim, **recipe_settings(
...     "coke", variant="single", num_samples=16, num_clusters=[4], out_dim=32, hidden_dim=64))
>>> batch = {VIEWS: [torch.randn(4, 3, 32, 32)], INDEX: torch.arange(4)}  # INDEX: dataset rows
>>> out = coke.loss(batch, vit, None, StepContext())
>>> out.loss.isfinite().item()
True
>>> out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.data.spec import INDEX, MULTICROP_JITTER, VIEWS, CropRecipe, ViewSpec
from ssl.distributed import all_gather_cat, all_gather_with_offset
from ssl.errors import IncompatibleConfigError
from ssl.heads.coke import CoKeHead
from ssl.losses.coke import cluster_logits, multi_crop_loss, single_view_loss, two_view_loss
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext
from ssl.objectives.coke_clustering import ConstrainedKMeans

VARIANTS = ("single", "two", "multi")
IMAGENET_SIZE = 1_281_167
IMAGENET_CLUSTERS = (3000, 4000, 5000)
# Per variant, the released scripts' temperature and weight of the large-view loss.
DEFAULT_TEMPERATURE = {"single": 0.1, "two": 0.05, "multi": 0.05}
DEFAULT_BETA = {"single": 1.0, "two": 1.0, "multi": 0.5}

STRONG_JITTER = (0.8, 0.8, 0.8, 0.2)
# main_single_view.py: one crop, strong jitter, blur p=0.5, no solarize (further globals alike).
SINGLE_VIEW_CROPS = CropRecipe(STRONG_JITTER, 0.5, 0.5, 0.0, STRONG_JITTER, 0.5, name="coke_single_view")
# main_double_view.py / main_multi_view.py: BYOL's asymmetric pair + strongly jittered small crops.
MULTI_VIEW_CROPS = CropRecipe(MULTICROP_JITTER, 1.0, 0.1, 0.2, STRONG_JITTER, 0.5, name="coke")


def default_cluster_counts(num_samples: int) -> list[int]:
    """3000 / 4000 / 5000 clusters at ImageNet's size, scaled with the dataset (at least 10 each).

    Keeps ImageNet's ~300-430 images per cluster: Fashion-MNIST (60k) gets 140 / 187 / 234.
    """
    scale = num_samples / IMAGENET_SIZE
    return [max(10, round(k * scale)) for k in IMAGENET_CLUSTERS]


def _or_recipe(value: Any, default: Any) -> Any:
    """null in the config: the recipe's value."""
    return default if value is None else value


class CoKe(Objective):
    name = "coke"
    needs_teacher = False
    recipe_sync_batchnorm = True  # the official code converts the whole model to SyncBN

    def __init__(
        self,
        embed_dim: int,
        *,
        variant: str,
        num_samples: int | None,
        num_clusters: Sequence[int] | None,
        out_dim: int,
        hidden_dim: int | None,
        temperature: float | None,
        dual_lr: float,
        ratio: float,
        alpha: float,
        beta: float | None,
        stage: int | None,
        label_slots: int,
        soft_temperature: float,
        small_crops: int,
        crop_scale: tuple[float, float],
        small_crop_scale: tuple[float, float],
    ) -> None:
        """Settings and their defaults: conf/objective/coke.yaml."""
        super().__init__()
        if num_samples is None:
            raise IncompatibleConfigError(
                "objective.coke.num_samples must be the number of pretraining images (its label memory has "
                "one row per image); `python -m ssl.pretrain` fills it in from the dataset."
            )
        if variant not in VARIANTS:
            raise IncompatibleConfigError(f"unknown CoKe variant '{variant}'; valid: {', '.join(VARIANTS)}")
        if stage is not None and variant != "single":
            raise IncompatibleConfigError(
                "CoKe's stage-2 soft labels belong to the single-view recipe: set objective.coke.stage=null "
                f"for variant={variant}, or use variant=single."
            )
        num_samples = int(num_samples)
        clusters = [int(k) for k in (num_clusters or default_cluster_counts(num_samples))]
        if not clusters or min(clusters) < 2 or max(clusters) > num_samples:
            raise IncompatibleConfigError(
                f"CoKe needs 2 <= K <= the number of training images ({num_samples}) for every head; got "
                f"num_clusters={clusters}. Set objective.coke.num_clusters=[...] (or null for "
                f"{default_cluster_counts(num_samples)})."
            )
        self.variant = variant
        self.num_samples = num_samples
        self.temperature = float(_or_recipe(temperature, DEFAULT_TEMPERATURE[variant]))
        self.alpha = float(alpha)
        self.beta = float(_or_recipe(beta, DEFAULT_BETA[variant]))
        self.small_crops = int(small_crops) if variant == "multi" else 0
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.small_crop_scale = (float(small_crop_scale[0]), float(small_crop_scale[1]))
        self.head = CoKeHead(embed_dim, hidden_dim, out_dim)
        self.clusterings = nn.ModuleList(
            ConstrainedKMeans(k, out_dim, num_samples, dual_lr, ratio, stage, label_slots, soft_temperature)
            for k in clusters
        )

    @classmethod
    def backbone_inputs(cls, backbone: Backbone) -> tuple[int]:
        return (backbone.embed_dim,)

    def view_spec(self) -> ViewSpec:
        if self.variant == "single":
            return ViewSpec(global_crops=1, crop_recipe=SINGLE_VIEW_CROPS, global_crop_scale=self.crop_scale)
        return ViewSpec(
            global_crops=2, local_crops=self.small_crops, crop_recipe=MULTI_VIEW_CROPS,
            global_crop_scale=self.crop_scale, local_crop_scale=self.small_crop_scale,
        )

    # ------------------------------------------------------------------------------- clustering
    @torch.no_grad()
    def cluster(
        self, features: torch.Tensor, indices: torch.Tensor, epoch: int
    ) -> list[torch.Tensor]:
        """Gather this rank's features / indices, update every head, return this rank's targets.

        The targets are read before the update (the previous epoch's labels); the update itself sees
        the whole global batch, identically on every rank.
        """
        gathered, offset = all_gather_with_offset(features.detach().float())
        all_indices = all_gather_cat(indices.to(features.device))
        local = slice(offset, offset + features.shape[0])
        # Non-finite features (a corrupt batch on any rank, a diverging step) would poison the
        # centres and label memory for good: such a batch updates no clustering state. Decided on
        # the device (no host sync): the update runs and writes the old state back.
        finite = torch.isfinite(gathered).all()
        targets = []
        for clustering in self.clusterings:
            fresh = clustering.assign(gathered, epoch)
            targets.append(clustering.targets(indices, fresh[local], epoch))
            clustering.update(gathered, all_indices, fresh, epoch, apply=finite)
        return targets

    def on_train_epoch_end(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        metrics: dict[str, torch.Tensor] = {}
        for j, clustering in enumerate(self.clusterings):
            for key, value in clustering.end_epoch(ctx.epoch).items():
                metrics[f"head{j}_{key}"] = value
        return metrics

    # ------------------------------------------------------------------------------- loss
    def pooled_feature_heads(self) -> nn.Module:
        return self.head

    def logits(self, features: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(predictor logits, projection logits) per head against the fixed previous-epoch centres."""
        pred = [cluster_logits(features[1], c.pre_centers, self.temperature) for c in self.clusterings]
        proj = [cluster_logits(features[0], c.pre_centers, self.temperature) for c in self.clusterings]
        return pred, proj

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        crops = batch[VIEWS]
        # One backbone pass per crop, as the official code: BatchNorm statistics stay per view.
        heads = [self.head(backbone(crop)) for crop in crops]
        logits = [self.logits(h) for h in heads]
        with torch.no_grad():
            if self.variant == "single":
                clustered = heads[0][0]
            else:  # the mean of the two large views' projections, not re-normalised
                clustered = (heads[0][0] + heads[1][0]) * 0.5
            targets = self.cluster(clustered, batch[INDEX], ctx.epoch)
        if self.variant == "single":
            pred, proj = logits[0]
            loss = single_view_loss(pred, proj, targets, self.beta)
        elif self.variant == "two":
            (pred1, proj1), (pred2, proj2) = logits
            loss = two_view_loss(pred1, pred2, proj1, proj2, targets, self.alpha)
        else:
            (pred1, proj1), (pred2, proj2) = logits[0], logits[1]
            pred_small = [[logits[2 + s][0][j] for s in range(self.small_crops)] for j in range(len(targets))]
            proj_small = [[logits[2 + s][1][j] for s in range(self.small_crops)] for j in range(len(targets))]
            loss = multi_crop_loss(
                pred1, pred2, proj1, proj2, pred_small, proj_small, targets, self.alpha, self.beta
            )
        return ObjectiveOutput(loss, self.step_metrics(logits[0][0], targets))

    @torch.no_grad()
    def step_metrics(
        self, pred_logits: list[torch.Tensor], targets: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Head 0: how often the predictor agrees with its target, and the dual / size spread so far."""
        first = self.clusterings[0]
        hard = targets[0] if not targets[0].is_floating_point() else targets[0].argmax(dim=1)
        sizes = first.counters.float()
        return {
            "target_accuracy": (pred_logits[0].argmax(dim=1) == hard).float().mean(),
            "dual_max": first.duals.max(),
            "epoch_min_size_ratio": sizes.min() / sizes.mean().clamp_min(1.0),
            "epoch_max_size_ratio": sizes.max() / sizes.mean().clamp_min(1.0),
        }
