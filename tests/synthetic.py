"""Synthetic image datasets the tests share (no network, no files): (PIL image, label) pairs.

Each image is a pure function of its index, so two datasets of the same kind are equal and a
test can rebuild what a worker saw.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import Dataset


def zero_label(index: int) -> int:
    return 0


def three_classes(index: int) -> int:
    return index % 3


class NoiseImages(Dataset):
    """`count` RGB images of uniform noise, image i seeded by i; labels from `label`."""

    def __init__(self, count: int, height: int = 20, width: int = 20,
                 label: Callable[[int], int] = zero_label) -> None:
        self.count, self.height, self.width, self.label = count, height, width, label

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        g = torch.Generator().manual_seed(i)
        pixels = (torch.rand(self.height, self.width, 3, generator=g) * 255).byte()
        return Image.fromarray(pixels.numpy()), self.label(i)


class Squares(Dataset):
    """`count` 16 px black images with a white 6 px square that moves with the index (label -1)."""

    def __init__(self, count: int = 20) -> None:
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        image = Image.new("RGB", (16, 16), (0, 0, 0))
        image.paste((255, 255, 255), (i % 8, i % 8, i % 8 + 6, i % 8 + 6))
        return image, -1
