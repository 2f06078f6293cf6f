"""PIL-side image operations the data workers run: random blur / solarize, the photometric half
of a crop on PIL images, and the conversions to normalised float or uint8 tensors.

All randomness comes from torch's generator, so the per-sample seeds of `ResumableSampler` (and
the per-worker seeds a DataLoader sets) make every crop reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms as T

from ssl.data.photometric import Photometric, coin

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
