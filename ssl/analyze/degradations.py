"""The degradations an objective trains on, as functions of one strength, built from its own parts.

An analysis must degrade images exactly as training does, so nothing here re-implements a
degradation: each knob wraps the data layer's code that training runs, configured the way the
objective configures it. Token masks come from the objective's own `batch_maskers()` (MAE's
`RandomTokenMasker`, data2vec's `BlockMasker`) rebuilt at another ratio; MFM's frequency masks from
its `FrequencyMasker` and `frequency_corrupt`; crops from the `crop_on=device` path (`draw_box`,
torchvision's RandomResizedCrop parameters, then `resized_crops`); colour jitter, blur, solarize
and grayscale from `Photometric.draw` + `apply_photometric` (the `augment_on=device` path).

Every knob maps [B, 3, H, W] images in [0, 1] to images in [0, 1] of the same size. Masked patches
become the dataset's mean colour (zero after normalisation): MAE's encoder drops them and
data2vec swaps in a learned token, but an image-space reference (raw pixels, a CNN) needs an image.
Small crops are cut at their training size and resized back to the image size for the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ssl.data.device_augment import apply_photometric
from ssl.data.device_crops import draw_box, resized_crops
from ssl.data.frequency import FrequencyMasker, frequency_corrupt
from ssl.data.masking import BlockMasker, BlockMaskGenerator, RandomTokenMasker
from ssl.data.photometric import Photometric, blur_radius_range
from ssl.data.spec import MULTICROP_JITTER, BatchMasker, ViewSpec

Apply = Callable[[torch.Tensor, float, int], torch.Tensor]  # (images01, strength, seed) -> images01


@dataclass(frozen=True)
class Degradation:
    """One knob: `apply(images01, strength, seed)`, its valid range, a default grid, and the
    strength training uses (`default`: one value, a (low, high) range it is drawn from, or None
    when the recipe does not use it)."""

    knob: str
    description: str
    low: float
    high: float
    grid: tuple[float, ...]
    default: float | tuple[float, float] | None
    apply: Apply
    open_low: bool = False
    open_high: bool = False

    def check(self, strengths: Sequence[float]) -> None:
        """Refuse a strength outside the knob's range, naming the range and the default grid."""
        for s in strengths:
            below = s <= self.low if self.open_low else s < self.low
            above = s >= self.high if self.open_high else s > self.high
            if below or above:
                lo = "(" if self.open_low else "["
                hi = ")" if self.open_high else "]"
                raise ValueError(
                    f"strength {s} is outside {self.knob}'s range {lo}{self.low:g}, {self.high:g}{hi} "
                    f"({self.description}); its default grid is {list(self.grid)}"
                )


def seeded(apply: Apply) -> Apply:
    """Draw from torch's global generator (as the data workers do) seeded per call, leaving the
    caller's generator state untouched."""

    def run(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return apply(images01, strength, seed)

    return run


def fill_patches(images01: torch.Tensor, mask: torch.Tensor, patch: int, fill: torch.Tensor) -> torch.Tensor:
    """Images with every patch where `mask` [B, L] is set (row-major grid) painted `fill` [3]."""
    batch, _, height, width = images01.shape
    grid = mask.view(batch, 1, height // patch, width // patch).to(images01.dtype)
    pixels = F.interpolate(grid, scale_factor=patch, mode="nearest")
    colour = fill.to(images01).view(1, -1, 1, 1)
    return images01 * (1.0 - pixels) + colour * pixels


def token_mask_knob(masker: RandomTokenMasker, patch: int, mean: torch.Tensor) -> Degradation:
    """MAE's random masking at `mask_ratio`, drawn by the objective's own masker class."""

    def apply(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        drawn = RandomTokenMasker(masker.num_tokens, strength, masker.prefix)(
            len(images01), torch.Generator().manual_seed(seed))
        return fill_patches(images01, drawn[masker.mask_key] > 0.5, patch, mean)

    return Degradation(
        "mask_ratio", "fraction of patches removed at random (MAE)", 0.0, 1.0,
        (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.9, 0.95), masker.mask_ratio, apply,
        open_low=True, open_high=True,
    )


def block_mask_knob(masker: BlockMasker, patch: int, mean: torch.Tensor) -> Degradation:
    """BEiT block masking covering `block_mask_ratio` of the grid (data2vec), the same generator."""
    generator = masker.generator
    grid = (generator.height, generator.width)

    def apply(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        rebuilt = BlockMasker(BlockMaskGenerator.scaled(grid, strength), masker.prefix)
        drawn = rebuilt(len(images01), torch.Generator().manual_seed(seed))
        return fill_patches(images01, drawn[masker.mask_key], patch, mean)

    return Degradation(
        "block_mask_ratio", "fraction of patches removed in blocks (data2vec / BEiT)", 0.0, 1.0,
        (0.1, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), generator.num_masked / (grid[0] * grid[1]), apply,
        open_low=True, open_high=True,
    )


def frequency_knobs(masker: FrequencyMasker) -> list[Degradation]:
    """MFM's filters at another radius: the recipe's low/high mix, and each filter alone."""
    height, width = masker.image_size
    half = min(height, width) / 2
    grid = tuple(round(f * half, 3) for f in (0.05, 0.1, 0.15, 0.2, 0.3, 0.45, 0.6, 0.8, 1.0))

    def filtered(lowpass_prob: float) -> Apply:
        def apply(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
            rebuilt = FrequencyMasker(masker.image_size, strength, lowpass_prob, masker.key)
            keep = rebuilt(len(images01), torch.Generator().manual_seed(seed))[masker.key]
            return frequency_corrupt(images01, keep)
        return apply

    def knob(name: str, what: str, prob: float) -> Degradation:
        return Degradation(name, what, 0.0, float(max(height, width)), grid, masker.radius,
                           filtered(prob), open_low=True)

    return [
        knob("frequency_radius", f"filter radius, low-pass with p={masker.lowpass_prob:g} else "
             "high-pass (MFM)", masker.lowpass_prob),
        knob("lowpass_radius", "low-pass radius: frequencies above it removed", 1.0),
        knob("highpass_radius", "high-pass radius: frequencies below it removed", 0.0),
    ]


def crop_knob(name: str, what: str, out_size: int, image_size: int,
              default: tuple[float, float] | None) -> Degradation:
    """RandomResizedCrop covering `strength` of the image area, at the crop's training size."""

    def apply(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        boxes = torch.stack([draw_box(image, (strength, strength)) for image in images01])
        crops = resized_crops(images01, boxes, out_size)
        if out_size != image_size:
            crops = F.interpolate(crops, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return crops.clamp(0.0, 1.0)

    return Degradation(name, what, 0.0, 1.0, (0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0), default,
                       seeded(apply), open_low=True)


def photometric_knob(name: str, what: str, low: float, high: float, grid: Sequence[float],
                     default: float | tuple[float, float] | None,
                     spec_at: Callable[[float], Photometric]) -> Degradation:
    """A `Photometric` spec at `strength`, its per-image draws, applied as the device path does."""
    zero, one = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)

    def apply(images01: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        spec = spec_at(strength)
        draws = torch.stack([spec.draw() for _ in range(len(images01))])
        return apply_photometric(images01, draws, spec, zero.to(images01), one.to(images01))

    return Degradation(name, what, low, high, tuple(grid), default, seeded(apply))


def photometric_knobs(spec: ViewSpec, image_size: int) -> list[Degradation]:
    """Colour jitter, blur, solarize and grayscale, each alone at probability 1 (solarize and
    grayscale: at the given probability), with the objective's recipe values as defaults."""
    multicrop = spec.global_crops > 0
    recipe = spec.crop_recipe
    jitter_default = (recipe.global_jitter[0] if multicrop and recipe.global_jitter != (0.0,) * 4
                      else spec.plain_color_jitter or None)
    b, c, s, h = MULTICROP_JITTER
    ratios = (1.0, c / b, s / b, h / b)  # the recipe's proportions, scaled by the brightness strength
    sigma_grid = tuple(round(image_size / 224 * f, 4) for f in (0, 0.5, 1, 2, 4, 8, 16, 32))
    probs = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    return [
        photometric_knob(
            "color_jitter", "ColorJitter(s, s, s/2, s/4) on every image (the recipe's proportions)",
            0.0, 2.0, (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5), jitter_default,
            lambda x: Photometric(tuple(x * r for r in ratios), 1.0)),
        photometric_knob(
            "blur_sigma", "Gaussian blur with this sigma (pixels at the dataset's size) on every image",
            0.0, image_size / 2, sigma_grid, blur_radius_range(image_size) if multicrop else None,
            lambda x: Photometric(blur_p=1.0, blur_sigma=(x, x))),
        photometric_knob(
            "solarize_prob", "probability of solarizing an image (threshold 128)", 0.0, 1.0, probs,
            recipe.other_global_solarize if multicrop else None,
            lambda x: Photometric(solarize_p=x)),
        photometric_knob(
            "grayscale_prob", "probability of turning an image grayscale", 0.0, 1.0, probs,
            0.2 if multicrop else None, lambda x: Photometric(grayscale_p=x)),
    ]


def objective_degradations(
    maskers: Sequence[BatchMasker], spec: ViewSpec, dataset_cfg: Any, patch: int | None
) -> dict[str, Degradation]:
    """Every knob an objective's training degradations offer, its own first.

    `maskers` / `spec`: the objective's `batch_maskers()` and `view_spec()`; `dataset_cfg` gives the
    sizes, mean and the crop scales a spec leaves to the dataset; `patch`: the ViT's patch size.
    """
    size = int(dataset_cfg.image_size)
    mean = torch.tensor(list(dataset_cfg.mean), dtype=torch.float32)
    knobs: list[Degradation] = []
    for masker in maskers:
        if isinstance(masker, RandomTokenMasker):
            knobs.append(token_mask_knob(masker, patch, mean))
        elif isinstance(masker, BlockMasker):
            knobs.append(block_mask_knob(masker, patch, mean))
        elif isinstance(masker, FrequencyMasker):
            knobs.extend(frequency_knobs(masker))
    if spec.global_crops:
        global_scale = spec.global_crop_scale or tuple(dataset_cfg.global_crop_scale)
        knobs.append(crop_knob("global_crop_scale", "area fraction of a global crop", size, size,
                               global_scale))
    if spec.local_crops:
        local_scale = spec.local_crop_scale or tuple(dataset_cfg.local_crop_scale)
        local = crop_knob("local_crop_scale", "area fraction of a local crop (cut at the local size)",
                          int(dataset_cfg.local_crop_size), size, local_scale)
        knobs.insert(0, local)  # the multi-crop methods' characteristic degradation
    if spec.plain_crops:
        knobs.append(crop_knob("plain_crop_scale", "area fraction of the masked-modeling crop", size, size,
                               spec.plain_crop_scale))
    knobs.extend(photometric_knobs(spec, size))
    return {k.knob: k for k in knobs}
