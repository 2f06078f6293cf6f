"""Augmented views: DINO-style multi-crop for pretraining and a clean transform for evaluation.

All randomness comes from torch's generator, so `torch.manual_seed` (and the per-worker seeds a
DataLoader sets) make the crops reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DINO's blur radius range, defined for 224 px crops.
BLUR_RADIUS_224 = (0.1, 2.0)


def _coin(p: float) -> bool:
    """True with probability p (p=1 always, p=0 never), drawn from torch's generator."""
    return p >= 1.0 or (p > 0.0 and torch.rand(()).item() < p)


class RandomGaussianBlur:
    """PIL Gaussian blur with probability `p` and radius ~ U(radius_min, radius_max)."""

    def __init__(self, p: float, radius_min: float, radius_max: float) -> None:
        self.p = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, image: Image.Image) -> Image.Image:
        if not _coin(self.p):
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
        return ImageOps.solarize(image, threshold=self.threshold) if _coin(self.p) else image

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


class MultiCropTransform:
    """DINO's multi-crop augmentation: `num_global` large and `num_local` small views.

    Returns a list of `num_global + num_local` normalised (3, H, W) float tensors, globals first.
    Every crop: RandomResizedCrop (bicubic) -> horizontal flip (p=0.5) -> ColorJitter(0.4, 0.4,
    0.2, 0.1) with p=0.8 -> grayscale (p=0.2). Then global crop 1: Gaussian blur (p=1.0); global
    crops 2, 3, ...: blur (p=0.1) and solarization (p=0.2, threshold 128); local crops: blur
    (p=0.5). This is the recipe of DINO's `DataAugmentationDINO`.

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
    ) -> None:
        if num_global < 1 or num_local < 0:
            raise ValueError(f"need num_global >= 1 and num_local >= 0, got {num_global}, {num_local}")
        self.num_global = int(num_global)
        self.num_local = int(num_local)
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.global_scale = (float(global_scale[0]), float(global_scale[1]))
        self.local_scale = (float(local_scale[0]), float(local_scale[1]))
        to_tensor = ToNormalizedTensor(mean, std)

        def pipeline(size: int, scale: tuple[float, float], tail: list[Any]) -> T.Compose:
            return T.Compose(
                [
                    T.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(p=0.5),
                    T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                    T.RandomGrayscale(p=0.2),
                    *tail,
                    to_tensor,
                ]
            )

        g_blur = blur_radius_range(self.global_size)
        l_blur = blur_radius_range(self.local_size)
        self.global_first = pipeline(self.global_size, self.global_scale, [RandomGaussianBlur(1.0, *g_blur)])
        self.global_other = pipeline(
            self.global_size,
            self.global_scale,
            [RandomGaussianBlur(0.1, *g_blur), RandomSolarize(0.2, threshold=128)],
        )
        self.local = pipeline(self.local_size, self.local_scale, [RandomGaussianBlur(0.5, *l_blur)])

    @classmethod
    def from_config(cls, cfg: Any, num_global: int = 2, num_local: int = 8) -> MultiCropTransform:
        """Build from a `dataset` config node (image_size, local_crop_size, *_crop_scale, mean, std)."""
        return cls(
            num_global=num_global,
            num_local=num_local,
            global_size=cfg.image_size,
            local_size=cfg.local_crop_size,
            global_scale=tuple(cfg.global_crop_scale),
            local_scale=tuple(cfg.local_crop_scale),
            mean=tuple(cfg.mean),
            std=tuple(cfg.std),
        )

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_first(image)]
        crops.extend(self.global_other(image) for _ in range(self.num_global - 1))
        crops.extend(self.local(image) for _ in range(self.num_local))
        return crops

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_global={self.num_global}, num_local={self.num_local}, "
            f"global_size={self.global_size}, local_size={self.local_size}, "
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
        self.pipeline = T.Compose(
            [
                *jitter,
                T.RandomResizedCrop(self.size, scale=self.scale, interpolation=InterpolationMode.BICUBIC),
                T.RandomHorizontalFlip(p=0.5),
                ToNormalizedTensor(mean, std),
            ]
        )

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, jitter={self.color_jitter})"


class PretrainViews:
    """Every view a set of objectives asks for, as a dict: "views" (multi-crop), "plain_views"."""

    def __init__(self, multicrop: MultiCropTransform | None, plain: PlainCropTransform | None,
                 plain_crops: int = 0) -> None:
        self.multicrop = multicrop
        self.plain = plain
        self.plain_crops = plain_crops if plain is not None else 0

    def __call__(self, image: Image.Image) -> dict[str, list[torch.Tensor]]:
        out: dict[str, list[torch.Tensor]] = {}
        if self.multicrop is not None:
            out["views"] = self.multicrop(image)
        if self.plain_crops:
            out["plain_views"] = [self.plain(image) for _ in range(self.plain_crops)]
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}(multicrop={self.multicrop}, plain={self.plain} x{self.plain_crops})"


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
