"""The data contract: what an objective asks the data layer for, in the data layer's own terms.

An objective hands the data module a `ViewSpec` (which crops, with which recipe) and the
`BatchMasker`s it wants run in the collate step; the data layer never learns which method asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


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


class BatchMasker(Protocol):
    """Draws per-sample masks for a batch in the data-loading collate step (see ssl/data)."""

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ...
