"""Augmented views: multi-crop for pretraining (DINO's or CoKe's recipe) and a clean evaluation transform.

All randomness comes from torch's generator, so `torch.manual_seed` (and the per-worker seeds a
DataLoader sets) make the crops reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl.data.device_augment import PLAIN_DRAWS, VIEW_DRAWS, DeviceAugment, Photometric, coin
from ssl.data.device_crops import CROP_ON, PLAIN_BOXES, SOURCE, VIEW_BOXES, draw_box

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's blur radius range, defined for 224 px crops.
BLUR_RADIUS_224 = (0.1, 2.0)


class RandomGaussianBlur:
    """PIL Gaussian blur with probability `p` and radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float, radius_min: float, radius_max: float) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if not coin(self.p):
            return image
        u = torch.rand(()).item()
        radius = self.radius_min + (self.radius_max - self.radius_min) * u
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, radius=({self.radius_min:.4g}, {self.radius_max:.4g}))"


class RandomSolarize:
    """PIL solarization (invert pixels >= threshold) with probability `p`."""

    def __init__(self, p: float, threshold: int = 128) -> None:
        self.p = p
        self.threshold = threshold

    def __call__(self, image: Image.Image) -> Image.Image:
        return ImageOps.solarize(image, threshold=self.threshold) if coin(self.p) else image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, threshold={self.threshold})"


class ToNormalizedTensor:
    """`ToTensor()` + `Normalize(mean, std)` fused into one multiply-subtract on a float copy.

    Equal to the torchvision pair, without the intermediate [0, 1] tensor. Non-RGB images are
    converted to RGB first so that the output always has three channels.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        mean_t = torch.as_tensor([float(m) for m in mean], dtype=torch.float32).view(-1, 1, 1)
        std_t = torch.as_tensor([float(s) for s in std], dtype=torch.float32).view(-1, 1, 1)
        if mean_t.numel() != 3 or std_t.numel() != 3 or bool((std_t <= 0).any()):
            raise ValueError(f"need 3 means and 3 positive stds, got mean={mean}, std={std}")
        self.mean = tuple(mean_t.flatten().tolist())
        self.std = tuple(std_t.flatten().tolist())
        self._scale = 1.0 / (255.0 * std_t)
        self._shift = mean_t / std_t

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        array = np.asarray(image, dtype=np.float32)  # (H, W, 3), a fresh writable copy
        tensor = torch.from_numpy(array).permute(2, 0, 1)
        return (tensor * self._scale).sub_(self._shift).contiguous()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


def blur_radius_range(size: int) -> tuple[float, float]:
    """DINO's U(0.1, 2.0) blur radius (for 224 px) scaled linearly to a `size` px crop."""
    factor = size / 224.0
    return BLUR_RADIUS_224[0] * factor, BLUR_RADIUS_224[1] * factor


Jitter = tuple[float, float, float, float]
DINO_JITTER: Jitter = (0.4, 0.4, 0.2, 0.1)
STRONG_JITTER: Jitter = (0.8, 0.8, 0.8, 0.2)


def photometric(jitter: Jitter, blur: float, solarize: float, size: int) -> Photometric:
    """One crop kind's photometric half: jitter (p=0.8), grayscale (p=0.2), blur, solarize."""
    return Photometric(tuple(jitter), 0.8, 0.2, blur, blur_radius_range(size), solarize)


def cpu_photometric(spec: Photometric) -> list[Any]:
    """The PIL transforms that apply `spec` in a data worker (data.augment_on=cpu)."""
    steps: list[Any] = [
        T.RandomApply([T.ColorJitter(*spec.jitter)], p=spec.jitter_p),
        T.RandomGrayscale(p=spec.grayscale_p),
    ]
    if spec.blur_p > 0.0:
        steps.append(RandomGaussianBlur(spec.blur_p, *spec.blur_sigma))
    if spec.solarize_p > 0.0:
        steps.append(RandomSolarize(spec.solarize_p, threshold=128))
    return steps


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """(3, H, W) uint8 RGB: a quarter of float32's bytes through the loader and to the device."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class CropRecipe:
    """The photometric half of a multi-crop recipe, so that methods can differ without new classes.

    Jitters are ColorJitter(brightness, contrast, saturation, hue), applied with p=0.8; the other
    fields are probabilities (0 leaves the step out). Every crop also gets RandomResizedCrop, flip
    and grayscale (p=0.2); the crop scales come from the dataset config or the objective's ViewSpec.
    """

    global_jitter: Jitter
    first_global_blur: float
    other_global_blur: float
    other_global_solarize: float
    local_jitter: Jitter
    local_blur: float

    def __post_init__(self) -> None:
        probs = (self.first_global_blur, self.other_global_blur, self.other_global_solarize, self.local_blur)
        if not all(0.0 <= p <= 1.0 for p in probs):
            raise ValueError(f"recipe probabilities must lie in [0, 1], got {probs}")
        if len(self.global_jitter) != 4 or len(self.local_jitter) != 4:
            raise ValueError(f"jitters need 4 values, got {self.global_jitter}, {self.local_jitter}")


CROP_RECIPES: dict[str, CropRecipe] = {
    # DINO's DataAugmentationDINO.
    "dino": CropRecipe(DINO_JITTER, 1.0, 0.1, 0.2, DINO_JITTER, 0.5),
    # CoKe main_single_view.py: one crop, strong jitter, blur p=0.5, no solarize (further globals alike).
    "coke_single_view": CropRecipe(STRONG_JITTER, 0.5, 0.5, 0.0, STRONG_JITTER, 0.5),
    # CoKe main_double_view.py / main_multi_view.py: BYOL's asymmetric pair + strongly jittered small crops.
    "coke": CropRecipe(DINO_JITTER, 1.0, 0.1, 0.2, STRONG_JITTER, 0.5),
}


def _resolve_recipe(recipe: CropRecipe | str) -> tuple[str, CropRecipe]:
    """(name, recipe) for a registered name or a CropRecipe ("custom" when it is not registered)."""
    if isinstance(recipe, CropRecipe):
        name = next((k for k, v in CROP_RECIPES.items() if v == recipe), "custom")
        return name, recipe
    if recipe not in CROP_RECIPES:
        raise ValueError(f"unknown crop recipe {recipe!r}; valid recipes: {', '.join(CROP_RECIPES)}")
    return recipe, CROP_RECIPES[recipe]


class MultiCropTransform:
    """Multi-crop augmentation: `num_global` large and `num_local` small views.

    Returns a list of `num_global + num_local` normalised (3, H, W) float tensors, globals first.
    Every crop: RandomResizedCrop (bicubic) -> horizontal flip (p=0.5) -> ColorJitter with p=0.8
    -> grayscale (p=0.2), then the blur / solarization of its kind (first global, other globals,
    locals). `recipe` (a CROP_RECIPES name or a CropRecipe) sets the jitter and probabilities.
    The default "dino" is DINO's `DataAugmentationDINO`: ColorJitter(0.4, 0.4, 0.2, 0.1) on every
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
        recipe: CropRecipe | str = "dino",
    ) -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        self.recipe_name, self.recipe = _resolve_recipe(recipe)
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
        recipe: CropRecipe | str = "dino",
        global_scale: Sequence[float] | None = None,
        local_scale: Sequence[float] | None = None,
    ) -> MultiCropTransform:
        """Build from a `dataset` config node (image_size, local_crop_size, *_crop_scale, mean, std).

        `global_scale` / `local_scale` override the dataset's crop scales (None keeps them), for
        methods whose recipe fixes its own (CoKe: 0.08-1 and 0.05-0.6).
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
            f"{type(self).__name__}(recipe={self.recipe_name!r}, num_global={self.num_global}, "
            f"num_local={self.num_local}, global_size={self.global_size}, local_size={self.local_size}, "
            f"global_scale={self.global_scale}, local_scale={self.local_scale})"
        )


class PlainCropTransform:
    """The masked-image-modeling augmentation of MAE and MFM: RandomResizedCrop + flip only.

    RandomResizedCrop(size, scale, bicubic) -> horizontal flip (p=0.5) -> normalise. MFM's
    official pipeline stops at [0, 1] pixels; its objective undoes the normalisation exactly.
    data2vec 1.0 (BEiT's pipeline) puts ColorJitter(j, j, j), always applied, in front.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: float = 0.0,
    ) -> None:
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.color_jitter = float(color_jitter)
        jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.geometric = T.Compose([
            T.RandomResizedCrop(self.size, scale=self.scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
        ])
        self.pipeline = T.Compose([*jitter, *self.geometric.transforms, ToNormalizedTensor(mean, std)])
        # On the device the jitter (always applied) follows the crop: the contrast blend then uses
        # the crop's mean luma instead of the whole image's, the only difference.
        j = self.color_jitter
        self.photometric = Photometric((j, j, j, 0.0), 1.0 if j else 0.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def crop_and_draws(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """data.augment_on=device: the uint8 crop and its photometric draws."""
        return to_uint8_tensor(self.geometric(image)), self.photometric.draw()

    def box_and_draws(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """data.crop_on=device: the crop's box (x1, y1, x2, y2, flip) and its photometric draws."""
        return draw_box(image, self.scale), self.photometric.draw()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, jitter={self.color_jitter})"


AUGMENT_ON = ("cpu", "device")


class PretrainViews:
    """Every view a set of objectives asks for, as a dict: "views" (multi-crop), "plain_views".

    augment_on="device": the crops are uint8 with their photometric draws beside them
    (VIEW_DRAWS, PLAIN_DRAWS). crop_on="device" as well: the decoded image (SOURCE) with one box
    per crop instead of the crops (VIEW_BOXES, PLAIN_BOXES). `device_augment()` finishes either on
    the training device.
    """

    def __init__(self, multicrop: MultiCropTransform | None, plain: PlainCropTransform | None,
                 plain_crops: int = 0, augment_on: str = "cpu", crop_on: str = "worker") -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"data.augment_on={augment_on!r}; valid values: {', '.join(AUGMENT_ON)}")
        if crop_on not in CROP_ON:
            raise ValueError(f"data.crop_on={crop_on!r}; valid values: {', '.join(CROP_ON)}")
        if crop_on == "device" and augment_on != "device":
            raise ValueError("data.crop_on=device needs data.augment_on=device (the colour "
                             "augmentations follow the crops onto the device)")
        self.multicrop = multicrop
        self.plain = plain
        self.plain_crops = plain_crops if plain is not None else 0
        self.augment_on = augment_on
        self.crop_on = crop_on

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        if self.crop_on == "device":
            return self.boxes(image)
        out: dict[str, list[torch.Tensor]] = {}
        deferred = self.augment_on == "device"
        if self.multicrop is not None:
            if deferred:
                out["views"], out[VIEW_DRAWS] = self.multicrop.crops_and_draws(image)
            else:
                out["views"] = self.multicrop(image)
        if self.plain_crops:
            if deferred:
                pairs = [self.plain.crop_and_draws(image) for _ in range(self.plain_crops)]
                out["plain_views"], out[PLAIN_DRAWS] = [c for c, _ in pairs], [d for _, d in pairs]
            else:
                out["plain_views"] = [self.plain(image) for _ in range(self.plain_crops)]
        return out

    def boxes(self, image: Image.Image) -> dict[str, Any]:
        """crop_on=device: the image decoded once (uint8) and every crop's box and draws."""
        out: dict[str, Any] = {SOURCE: to_uint8_tensor(image)}
        if self.multicrop is not None:
            out[VIEW_BOXES], out[VIEW_DRAWS] = self.multicrop.boxes_and_draws(image)
        if self.plain_crops:
            pairs = [self.plain.box_and_draws(image) for _ in range(self.plain_crops)]
            out[PLAIN_BOXES], out[PLAIN_DRAWS] = [b for b, _ in pairs], [d for _, d in pairs]
        return out

    def device_augment(self, mean: Sequence[float], std: Sequence[float]) -> DeviceAugment | None:
        """What finishes these views on the device (None when the workers finish them)."""
        if self.augment_on != "device":
            return None
        views = self.multicrop.view_photometrics() if self.multicrop is not None else []
        sizes = self.multicrop.view_sizes() if self.multicrop is not None else []
        plain = self.plain.photometric if self.plain_crops else None
        plain_size = self.plain.size if self.plain_crops else None
        return DeviceAugment(views, plain, mean, std, sizes, plain_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(multicrop={self.multicrop}, plain={self.plain} x{self.plain_crops}, "
                f"augment_on={self.augment_on!r}, crop_on={self.crop_on!r})")


class ResizeIfNeeded:
    """Resize to exactly (size, size) (bicubic), skipping images that already have that size."""

    def __init__(self, size: int) -> None:
        self.size = int(size)

    def __call__(self, image: Image.Image) -> Image.Image:
        if image.size == (self.size, self.size):
            return image
        return image.resize((self.size, self.size), Image.Resampling.BICUBIC)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def eval_transform(
    image_size: int, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> T.Compose:
    """Deterministic transform for k-NN / linear evaluation.

    image_size >= 64: the standard resize to image_size * 256/224 (bicubic) + centre crop. Below
    that (28 px Fashion-MNIST, 32 px CIFAR) cropping would drop a large part of the object, so the
    image is only resized to (image_size, image_size), and only when it is not that size already.
    """
    image_size = int(image_size)
    if image_size >= 64:
        steps: list[Any] = [
            T.Resize(int(image_size * 256 / 224), interpolation=InterpolationMode.BICUBIC),
            T.CenterCrop(image_size),
        ]
    else:
        steps = [ResizeIfNeeded(image_size)]
    return T.Compose([*steps, ToNormalizedTensor(mean, std)])
