"""One crop kind's photometric augmentation as data: its settings and the random draws it makes.

The data workers draw every random number of a crop's colour augmentation here (from the sample's
seeded torch RNG), whether the workers then apply it with PIL (`ssl/data/pil_ops.py`) or the device
applies it in batch (`ssl/data/device_augment.py`): one source of randomness for both paths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Columns of one crop's row of draws.
JITTER_ON, BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3, 4
ORDER = slice(5, 9)  # the permutation of the four jitter ops (0 brightness ... 3 hue)
GRAYSCALE, BLUR, SIGMA, SOLARIZE = 9, 10, 11, 12
NUM_DRAWS = 13
# Batch keys of the draws that travel with the uint8 crops from the workers.
VIEW_DRAWS, PLAIN_DRAWS = "view_draws", "plain_view_draws"


def _uniform(low: float, high: float) -> float:
    return float(torch.empty(1).uniform_(low, high))


def coin(p: float) -> bool:
    """True with probability p (p=1 always, p=0 never), drawing from torch's generator only when
    0 < p < 1; the CPU recipe's transforms flip the same coin."""
    return p >= 1.0 or (p > 0.0 and bool(torch.rand(()) < p))


@dataclass(frozen=True)
class Photometric:
    """The photometric half of one crop kind: what `draw` samples and `apply_photometric` applies.

    `jitter` is ColorJitter(brightness, contrast, saturation, hue), applied with `jitter_p`;
    `blur_sigma` the Gaussian's standard deviation range (PIL's blur radius).
    """

    jitter: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def draw(self) -> torch.Tensor:
        """One crop's random draws (NUM_DRAWS floats) from torch's generator."""
        row = torch.zeros(NUM_DRAWS)
        row[BRIGHTNESS:HUE] = 1.0  # identity factors
        row[ORDER] = torch.arange(4, dtype=torch.float32)
        if self.jitter_p > 0.0 and any(self.jitter):
            row[JITTER_ON] = coin(self.jitter_p)
            b, c, s, h = self.jitter
            row[ORDER] = torch.randperm(4).float()
            for column, strength in ((BRIGHTNESS, b), (CONTRAST, c), (SATURATION, s)):
                if strength:
                    row[column] = _uniform(max(0.0, 1.0 - strength), 1.0 + strength)
            if h:
                row[HUE] = _uniform(-h, h)
        row[GRAYSCALE] = coin(self.grayscale_p)
        row[BLUR] = coin(self.blur_p)
        if self.blur_p > 0.0:
            row[SIGMA] = _uniform(*self.blur_sigma)
        row[SOLARIZE] = coin(self.solarize_p)
        return row

    def kernel_size(self) -> int:
        """The one odd kernel size for the whole batch: 3 sigma either side of the largest sigma."""
        return 2 * max(1, math.ceil(3.0 * self.blur_sigma[1])) + 1


# DINO's blur radius range, defined for 224 px crops.
BLUR_RADIUS_224 = (0.1, 2.0)


def blur_radius_range(size: int) -> tuple[float, float]:
    """The U(0.1, 2.0) blur radius (for 224 px) scaled linearly to a `size` px crop."""
    factor = size / 224.0
    return BLUR_RADIUS_224[0] * factor, BLUR_RADIUS_224[1] * factor


Jitter = tuple[float, float, float, float]


def photometric(jitter: Jitter, blur: float, solarize: float, size: int) -> Photometric:
    """One multi-crop kind's photometric half: jitter (p=0.8), grayscale (p=0.2), blur, solarize."""
    return Photometric(tuple(jitter), 0.8, 0.2, blur, blur_radius_range(size), solarize)
