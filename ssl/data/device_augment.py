"""Photometric augmentation on the training device, in batch (`data.augment_on=device`).

On a GPU the CPU-side colour jitter and Gaussian blur of ten multi-crop views per image are what
starves the accelerator (solo-learn needed NVIDIA DALI for it). With `augment_on=device` the data
workers only decode the image once, cut every crop (RandomResizedCrop + flip, the geometric part,
which needs the full-size image) and ship it as uint8 (a quarter of the bytes of float32), plus
one row of random draws per crop. The colour jitter (random order per crop), grayscale, Gaussian
blur, solarization and normalisation then run here, batched over every crop of one kind.

The draws are made in the worker from the sample's own seeded torch RNG, with the CPU recipe's
probabilities and ranges, so a run stays reproducible and resumes exactly; the device only
applies them. The
ops follow torchvision's tensor definitions (`adjust_brightness`, `adjust_contrast`,
`adjust_saturation`, `adjust_hue`, `rgb_to_grayscale`, `gaussian_blur` with reflect padding,
`solarize`) on float pixels in [0, 1]; the CPU pipeline runs PIL's versions, which round to uint8
after every op, so the two agree in distribution, not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl.data.device_crops import PLAIN_BOXES, SOURCE, VIEW_BOXES, resized_crops
from ssl.data.photometric import (
    BLUR,
    BRIGHTNESS,
    CONTRAST,
    GRAYSCALE,
    HUE,
    JITTER_ON,
    ORDER,
    PLAIN_DRAWS,
    SATURATION,
    SIGMA,
    SOLARIZE,
    VIEW_DRAWS,
    Photometric,
)
from ssl.data.spec import PLAIN_VIEWS, VIEWS

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # PIL's solarize(threshold=128) on [0, 1] pixels


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) luma of (N, 3, H, W) RGB."""
    r, g, b = x.unbind(dim=1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(1)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.view(-1, 1, 1, 1)


def blend(x: torch.Tensor, factor: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """f x + (1 - f) r, clamped to [0, 1], one factor per image (torchvision's `_blend`)."""
    f = _per_sample(factor)
    return (f * x + (1.0 - f) * reference).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with black."""
    return blend(x, factor, torch.zeros_like(x[:, :1]))


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the image's mean luma (one scalar per image)."""
    return blend(x, factor, grayscale(x).mean(dim=(1, 2, 3), keepdim=True))


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Blend with the pixel's own luma."""
    return blend(x, factor, grayscale(x))


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV, hue in [0, 1)."""
    r, g, b = x.unbind(dim=1)
    high = x.amax(dim=1)
    low = x.amin(dim=1)
    chroma = high - low
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(high), high)
    safe_chroma = torch.where(grey, torch.ones_like(chroma), chroma)
    dr, dg, db = ((high - c) / safe_chroma for c in (r, g, b))
    is_r = high == r
    is_g = (high == g) & ~is_r
    is_b = ~(is_r | is_g)
    hue = is_r * (db - dg) + is_g * (2.0 + dr - db) + is_b * (4.0 + dg - dr)
    hue = torch.fmod(hue / 6.0 + 1.0, 1.0)
    return torch.stack((hue, saturation, high), dim=1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `rgb_to_hsv`: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    with n = 5, 3, 1 for r, g, b (the sector table in closed form: no (N, 3, 6, H, W) stack)."""
    h, s, v = x.unbind(dim=1)
    chroma = v * s
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = torch.remainder(h * 6.0 + n, 6.0)
        channels.append(v - chroma * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by `shift` turns (in [-0.5, 0.5]) per image."""
    hsv = rgb_to_hsv(x)
    hue = torch.remainder(hsv[:, 0] + shift.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.cat((hue.unsqueeze(1), hsv[:, 1:]), dim=1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image and reflect padding (torchvision's)."""
    n, c, h, w = x.shape
    half = kernel_size // 2
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    mode = "reflect" if half < min(h, w) else "replicate"
    flat = F.pad(x.reshape(1, n * c, h, w), (half, half, half, half), mode=mode)
    flat = F.conv2d(flat, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    flat = F.conv2d(flat, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return flat.view(n, c, h, w)


def _blend(x: torch.Tensor, op: torch.Tensor, factors: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Brightness (op 0), contrast (1) or saturation (2) per crop, as one `blend` whose reference is
    black, the image's mean luma or the pixel's luma; f = 1 (an exact no-op) where not `chosen`."""
    f = torch.where(chosen, factors.gather(1, op.clamp(max=2).unsqueeze(1)).squeeze(1), 1.0)
    luma = grayscale(x)
    op = _per_sample(op)
    reference = torch.where(
        op == 1, luma.mean(dim=(1, 2, 3), keepdim=True), torch.where(op == 2, luma, torch.zeros_like(luma))
    )
    return blend(x, f, reference)


def _jitter(x: torch.Tensor, draws: torch.Tensor, spec: Photometric) -> torch.Tensor:
    """ColorJitter with each crop's own order of its four ops.

    The hue rotation (the costly op) runs once over the batch: first every crop's blends that come
    before its hue in its order, then the hue, then the blends after it. Each blend pass covers
    brightness, contrast and saturation at one position of the order for the whole batch.
    """
    on = draws[:, JITTER_ON] > 0.5
    factors = draws[:, [BRIGHTNESS, CONTRAST, SATURATION]]
    order = draws[:, ORDER].long()
    blends = bool(spec.jitter[0] or spec.jitter[1] or spec.jitter[2])
    hue_at = (order == 3).float().argmax(dim=1)  # the position of the hue in each crop's order

    def blend_positions(out: torch.Tensor, before_hue: bool) -> torch.Tensor:
        for position in range(4):
            op = order[:, position]
            side = position < hue_at if before_hue else position > hue_at
            out = _blend(out, op, factors, on & (op < 3) & side)
        return out

    if blends:
        x = blend_positions(x, before_hue=True)
    if spec.jitter[3]:
        x = torch.where(_per_sample(on), adjust_hue(x, draws[:, HUE]), x)
    if blends:
        x = blend_positions(x, before_hue=False)
    return x


def apply_photometric(
    crops: torch.Tensor, draws: torch.Tensor, spec: Photometric,
    mean: torch.Tensor, std: torch.Tensor,
) -> torch.Tensor:
    """uint8 (N, 3, H, W) crops (or float ones in [0, 1]) + their (N, NUM_DRAWS) draws ->
    normalised float32 crops.

    `mean` / `std`: (1, 3, 1, 1) tensors on the crops' device (made once: a fresh host tensor
    copied to a GPU every step would be a synchronising copy).

    Order as in the CPU recipe: jitter (each crop's own op order) -> grayscale -> blur ->
    solarize -> normalise. Every branch is a `torch.where` on per-crop flags: no host sync.
    """
    x = crops.float().div_(255.0) if crops.dtype == torch.uint8 else crops.float()
    draws = draws.to(device=x.device, dtype=torch.float32)

    def where(flag: torch.Tensor, changed: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        return torch.where(_per_sample(flag) > 0.5, changed, kept)

    if spec.jitter_p > 0.0 and any(spec.jitter):
        x = _jitter(x, draws, spec)
    if spec.grayscale_p > 0.0:
        x = where(draws[:, GRAYSCALE], grayscale(x).expand_as(x), x)
    if spec.blur_p > 0.0:
        sigma = draws[:, SIGMA].clamp(min=1e-3)
        x = where(draws[:, BLUR], gaussian_blur(x, sigma, spec.kernel_size()), x)
    if spec.solarize_p > 0.0:
        solarized = torch.where(x >= SOLARIZE_THRESHOLD, 1.0 - x, x)
        x = where(draws[:, SOLARIZE], solarized, x)
    return x.sub_(mean).div_(std).contiguous()


class DeviceAugment:
    """Finishes the deferred augmentations of a batch already on the device.

    `view_specs[i]` is the Photometric of batch[VIEWS][i]; `plain_spec` that of every plain
    view. With `data.crop_on=device` the batch holds the decoded images (SOURCE) and one box per
    crop instead of crops: `view_sizes` / `plain_size` are then the crops' sizes, cut first
    (ssl/data/device_crops.py). Crops of one kind and size (the local crops, the later global
    crops) go through `apply_photometric` as one batch. The result replaces the uint8 data, so
    objectives see the batch the CPU pipeline would have produced.
    """

    def __init__(
        self, view_specs: Sequence[Photometric], plain_spec: Photometric | None,
        mean: Sequence[float], std: Sequence[float],
        view_sizes: Sequence[int] = (), plain_size: int | None = None,
    ) -> None:
        self.view_specs = list(view_specs)
        self.plain_spec = plain_spec
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.view_sizes = list(view_sizes)
        self.plain_size = plain_size
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            as_column = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1).to(device)  # noqa: E731
            self._stats[device] = (as_column(self.mean), as_column(self.std))
        return self._stats[device]

    def apply(self, crops: list[torch.Tensor], draws: list[torch.Tensor],
              specs: Sequence[Photometric]) -> list[torch.Tensor]:
        mean, std = self.stats(crops[0].device)
        groups: dict[tuple[Photometric, tuple[int, ...]], list[int]] = {}
        for i, (crop, spec) in enumerate(zip(crops, specs)):
            groups.setdefault((spec, tuple(crop.shape)), []).append(i)
        out: list[torch.Tensor] = [crops[0]] * len(crops)
        for (spec, _), members in groups.items():
            joined = apply_photometric(
                torch.cat([crops[i] for i in members]), torch.cat([draws[i] for i in members]),
                spec, mean, std,
            )
            for i, part in zip(members, joined.chunk(len(members))):
                out[i] = part
        return out

    def cut_crops(self, batch: dict) -> None:
        """crop_on=device: the views from the decoded images and their boxes, as [0, 1] floats."""
        images = batch.pop(SOURCE).float().div_(255.0)
        if VIEW_BOXES in batch:
            boxes = batch.pop(VIEW_BOXES)
            batch[VIEWS] = [resized_crops(images, b, size) for b, size in zip(boxes, self.view_sizes)]
        if PLAIN_BOXES in batch:
            batch[PLAIN_VIEWS] = [resized_crops(images, b, self.plain_size) for b in batch.pop(PLAIN_BOXES)]

    def __call__(self, batch: dict) -> dict:
        if SOURCE in batch:
            self.cut_crops(batch)
        if VIEW_DRAWS in batch:
            batch[VIEWS] = self.apply(batch[VIEWS], batch.pop(VIEW_DRAWS), self.view_specs)
        if PLAIN_DRAWS in batch and self.plain_spec is not None:
            plain = batch[PLAIN_VIEWS]
            batch[PLAIN_VIEWS] = self.apply(plain, batch.pop(PLAIN_DRAWS), [self.plain_spec] * len(plain))
        return batch

    def __repr__(self) -> str:
        return f"{type(self).__name__}(views={len(self.view_specs)}, plain={self.plain_spec is not None})"
