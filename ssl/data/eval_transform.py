"""The deterministic transform for k-NN / linear evaluation and pictures of clean images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl.data.pil_ops import IMAGENET_MEAN, IMAGENET_STD, ResizeIfNeeded, ToNormalizedTensor


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
