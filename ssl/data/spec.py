"""The data contract: what an objective asks the data layer for, in the data layer's own terms.

An objective hands the data module a `ViewSpec` (which crops, with a `CropRecipe` object it owns)
and the `BatchMasker`s it wants run in the collate step; each masker says which batch keys it
writes. The data layer never learns which method asked, so a new objective touches no file here.

Batch keys the data layer writes (besides the maskers' own): VIEWS (multi-crop, globals first),
PLAIN_VIEWS (plain crops), INDEX (the sample's dataset index), LABEL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

VIEWS = "views"
PLAIN_VIEWS = "plain_views"
INDEX = "index"
LABEL = "label"

Jitter = tuple[float, float, float, float]
# ColorJitter(brightness, contrast, saturation, hue) of the standard multi-crop recipe.
MULTICROP_JITTER: Jitter = (0.4, 0.4, 0.2, 0.1)


@dataclass(frozen=True)
class CropRecipe:
    """The photometric half of a multi-crop recipe, so that objectives can differ without new classes.

    The defaults are the standard multi-crop recipe (DINO's DataAugmentationDINO, which most
    multi-crop methods reuse); an objective with another recipe builds its own (CoKe's live in
    ssl/objectives/coke.py). Jitters are ColorJitter(brightness, contrast, saturation, hue),
    applied with p=0.8; the other fields are probabilities (0 leaves the step out). Every crop also
    gets RandomResizedCrop, flip and grayscale (p=0.2); the crop scales come from the dataset
    config or the ViewSpec. `name` only labels the recipe in messages and reprs.
    """

    global_jitter: Jitter = MULTICROP_JITTER
    first_global_blur: float = 1.0
    other_global_blur: float = 0.1
    other_global_solarize: float = 0.2
    local_jitter: Jitter = MULTICROP_JITTER
    local_blur: float = 0.5
    name: str = "multicrop"

    def __post_init__(self) -> None:
        probs = (self.first_global_blur, self.other_global_blur, self.other_global_solarize, self.local_blur)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"recipe probabilities must lie in [0, 1], got {probs}")
        if len(self.global_jitter) != 4 or len(self.local_jitter) != 4:
            raise ValueError(f"jitters need 4 values, got {self.global_jitter}, {self.local_jitter}")


def _pair(scale: Sequence[float] | None) -> tuple[float, float] | None:
    """A crop scale as a hashable float pair (configs hand over lists), None kept."""
    return None if scale is None else (float(scale[0]), float(scale[1]))


@dataclass(frozen=True)
class ViewSpec:
    """Crops the data module must produce for an objective (sizes come from the dataset).

    global_crops / local_crops: multi-crop views, in `batch[VIEWS]` (globals first), augmented
    per `crop_recipe`. global_crop_scale / local_crop_scale: their RandomResizedCrop scales, for
    objectives whose recipe fixes them (CoKe: 0.08-1); None takes the dataset's. All objectives
    that ask for global crops share one multi-crop pipeline, so they must agree on these three.
    plain_crops: RandomResizedCrop(scale=plain_crop_scale) + flip, the masked-image-modeling
    recipe, at the dataset's image size, in `batch[PLAIN_VIEWS]`; `plain_color_jitter` j > 0
    puts ColorJitter(j, j, j) first.
    any_crop_recipe: the objective reads global crops but has no recipe of its own (a classifier
    on the first global crop): beside another objective's global crops it takes their recipe and
    scales; alone, its own (the defaults).
    """

    global_crops: int = 0
    local_crops: int = 0
    plain_crops: int = 0
    plain_crop_scale: tuple[float, float] = (0.2, 1.0)
    plain_color_jitter: float = 0.0
    crop_recipe: CropRecipe = field(default_factory=CropRecipe)
    global_crop_scale: tuple[float, float] | None = None
    local_crop_scale: tuple[float, float] | None = None
    any_crop_recipe: bool = False

    def __post_init__(self) -> None:
        # Lists from a config compare unequal to tuples: normalise so specs merge by value.
        object.__setattr__(self, "plain_crop_scale", _pair(self.plain_crop_scale))
        object.__setattr__(self, "global_crop_scale", _pair(self.global_crop_scale))
        object.__setattr__(self, "local_crop_scale", _pair(self.local_crop_scale))


class BatchMasker(Protocol):
    """Draws per-sample masks for a batch in the data-loading collate step (see ssl/data).

    `keys`: the batch keys it writes, so objectives read them from the masker (never as literals)
    and the data module can refuse two maskers writing the same key.
    """

    keys: tuple[str, ...]

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        ...
