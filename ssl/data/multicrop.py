"""Multi-crop views: a few large (global) and many small (local) crops of one image.

All randomness comes from torch's generator, so `torch.manual_seed` (and the per-sample seeds of
`ResumableSampler`) make the crops reproducible. With data.augment_on=device the workers do the
geometric half only and ship each crop's photometric draws (ssl/data/photometric.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl.data.device_crops import draw_box
from ssl.data.photometric import Photometric, photometric
from ssl.data.pil_ops import IMAGENET_MEAN, IMAGENET_STD, ToNormalizedTensor, cpu_photometric, to_uint8_tensor
from ssl.data.spec import CropRecipe


class MultiCropTransform:
    """Multi-crop augmentation: `num_global` large and `num_local` small views.

    Returns a list of `num_global + num_local` normalised (3, H, W) float tensors, globals first.
    Every crop: RandomResizedCrop (bicubic) -> horizontal flip (p=0.5) -> ColorJitter with p=0.8
    -> grayscale (p=0.2), then the blur / solarization of its kind (first global, other globals,
    locals). `recipe` sets the jitter and probabilities. The default `CropRecipe()` is the
    standard multi-crop recipe (DINO's `DataAugmentationDINO`): ColorJitter(0.4, 0.4, 0.2, 0.1) on every
    crop; global crop 1: Gaussian blur (p=1.0); global crops 2, 3, ...: blur (p=0.1) and
    solarization (p=0.2, threshold 128); local crops: blur (p=0.5).

    The blur radius is U(0.1, 2.0) at 224 px and is scaled linearly with the crop size (so
    U(0.0125, 0.25) at 28 px): the same relative blur at every resolution, where DINO's absolute
    radius of 2 px would erase a 28 px image.
    """

    def __init__(
        self,
        num_global: int = 2,
        num_local: int = 8,
        global_size: int = 224,
        local_size: int = 96,
        global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        recipe: CropRecipe | None = None,
    ) -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        self.recipe = recipe if recipe is not None else CropRecipe()
        self.num_global = int(num_global)
        self.num_local = int(num_local)
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.global_scale = (float(global_scale[0]), float(global_scale[1]))
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        to_tensor = ToNormalizedTensor(mean, std)
        r = self.recipe
        g, loc = self.global_size, self.local_size
        kinds = {
            "global_first": (g, self.global_scale, photometric(r.global_jitter, r.first_global_blur, 0.0, g)),
            "global_other": (g, self.global_scale, photometric(
                r.global_jitter, r.other_global_blur, r.other_global_solarize, g)),
            "local": (loc, self.local_scale, photometric(r.local_jitter, r.local_blur, 0.0, loc)),
        }
        self.kinds = kinds  # name -> (crop size, crop scale, photometric half)
        self.photometric = {name: spec for name, (_, _, spec) in kinds.items()}
        self.geometric = {
            name: T.Compose([
                T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
            ])
            for name, (size, scale, _) in kinds.items()
        }
        full = {
            name: T.Compose([*self.geometric[name].transforms, *cpu_photometric(spec), to_tensor])
            for name, spec in self.photometric.items()
        }
        self._full = full
        self.global_first, self.global_other, self.local = (
            full["global_first"], full["global_other"], full["local"]
        )

    def kind_names(self) -> list[str]:
        """The crop kind of every output position, globals first."""
        return ["global_first"] + ["global_other"] * (self.num_global - 1) + ["local"] * self.num_local

    def boxes_and_draws(self, image: Image.Image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """data.crop_on=device: every crop's box (x1, y1, x2, y2, flip) and photometric draws."""
        boxes, draws = [], []
        for name in self.kind_names():
            boxes.append(draw_box(image, self.kinds[name][1]))
            draws.append(self.photometric[name].draw())
        return boxes, draws

    def view_sizes(self) -> list[int]:
        """The side of every output position's crop."""
        return [self.kinds[name][0] for name in self.kind_names()]

    def view_photometrics(self) -> list[Photometric]:
        """The photometric half of every output position (what the device applies when deferred)."""
        return [self.photometric[name] for name in self.kind_names()]

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        num_global: int = 2,
        num_local: int = 8,
        recipe: CropRecipe | None = None,
        global_scale: Sequence[float] | None = None,
        local_scale: Sequence[float] | None = None,
    ) -> MultiCropTransform:
        """Build from a `dataset` config node (image_size, local_crop_size, *_crop_scale, mean, std).

        `global_scale` / `local_scale` override the dataset's crop scales (None keeps them), for
        methods whose recipe fixes its own (e.g. 0.08-1 and 0.05-0.6).
        """
        return cls(
            num_global=num_global,
            num_local=num_local,
            global_size=cfg.image_size,
            local_size=cfg.local_crop_size,
            global_scale=tuple(cfg.global_crop_scale if global_scale is None else global_scale),
            local_scale=tuple(cfg.local_crop_scale if local_scale is None else local_scale),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
            recipe=recipe,
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        """Every crop, fully augmented and normalised (data.augment_on=cpu)."""
        return [self._full[name](image) for name in self.kind_names()]

    def crops_and_draws(self, image: Image.Image) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """data.augment_on=device: uint8 crops (geometric half done) and their photometric draws."""
        crops, draws = [], []
        for name in self.kind_names():
            crops.append(to_uint8_tensor(self.geometric[name](image)))
            draws.append(self.photometric[name].draw())
        return crops, draws

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(recipe={self.recipe.name!r}, num_global={self.num_global}, "
            f"num_local={self.num_local}, global_size={self.global_size}, local_size={self.local_size}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale})"
        )
