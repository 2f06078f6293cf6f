"""Frequency masks and the spectrum corruption of Masked Frequency Modeling (MFM, Xie et al. 2023).

Masks live in the fftshift-ed spectrum, where DC sits at index N // 2 on each axis; 1 means the
frequency is kept. The masks are drawn in the DataLoader's collate step, the corruption runs on the
accelerator inside the objective.
"""

from __future__ import annotations

import torch


def lowpass_mask(height: int, width: int, radius: float) -> torch.Tensor:
    """Bool [H, W], True strictly inside the circle of `radius` around DC in the fftshift-ed layout.

    The centre is (H // 2, W // 2), where fftshift puts DC for even and odd sizes alike. The official
    generator also has an outer radius (999) that never bites, so only the inner disc is modelled.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"mask size must be positive, got {height}x{width}")
    if not radius > 0:
        raise ValueError(f"radius must be > 0, got {radius}")
    dy = torch.arange(height).sub_(height // 2).unsqueeze(1)
    dx = torch.arange(width).sub_(width // 2).unsqueeze(0)
    return dy * dy + dx * dx < radius * radius


def scaled_radius(image_size: int, radius_at_224: float = 16.0) -> float:
    """The radius scaled linearly with the image size, so a small-image run removes the same band.

    The paper's r = 16 at 224 px becomes 2.0 at 28 px.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return radius_at_224 * image_size / 224


class FrequencyMasker:
    """Draws one keep mask per image: low-pass with probability `lowpass_prob`, else high-pass.

    Low-pass keeps |f| < radius; high-pass is its complement (it also removes DC). The released
    configs use a fixed radius (16 at 224 px) and lowpass_prob 0.5 (ViT) or 0.3 (ResNet-50).
    Draws use torch's RNG (the global one unless a generator is given), so the DataLoader's
    per-worker seeding makes them differ across workers and ranks. Satisfies `BatchMasker`.
    """

    def __init__(
        self,
        image_size: int | tuple[int, int],
        radius: float,
        lowpass_prob: float,
        key: str = "frequency_mask",
    ) -> None:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        if not 0.0 <= lowpass_prob <= 1.0:
            raise ValueError(f"lowpass_prob must be in [0, 1], got {lowpass_prob}")
        self.image_size = (height, width)
        self.radius = radius
        self.lowpass_prob = lowpass_prob
        self.key = key
        self.keys = (key,)
        self.lowpass = lowpass_mask(height, width, radius).float()

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """{key: float32 [B, H, W]} with 1 = frequency kept."""
        if batch_size < 0:
            raise ValueError(f"batch_size must be >= 0, got {batch_size}")
        probs = torch.full((batch_size, 1, 1), float(self.lowpass_prob))
        is_lowpass = torch.bernoulli(probs, generator=generator).bool()
        masks = torch.where(is_lowpass, self.lowpass, 1.0 - self.lowpass)
        return {self.key: masks}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, radius={self.radius}, "
            f"lowpass_prob={self.lowpass_prob}, key={self.key!r})"
        )


def frequency_corrupt(images01: torch.Tensor, keep_mask: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """Images with the masked-out frequencies removed: real(ifft2(ifftshift(fftshift(fft2(x)) * M))).

    images01: [B, C, H, W] in [0, 1] (before ImageNet normalisation, as in the official code).
    keep_mask: [B, H, W], 1 = kept, shared over channels. The result is clamped to [0, 1] as the
    official code does, which discards the negative half of a high-pass image; `clamp=False`
    exposes the raw filtered image. Runs in float32 with autocast off: half-precision FFTs only
    support power-of-two sizes and 224 is not one.
    """
    if images01.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images01.shape)}")
    batch, _, height, width = images01.shape
    if tuple(keep_mask.shape) != (batch, height, width):
        raise ValueError(f"keep_mask must be [{batch}, {height}, {width}], got {tuple(keep_mask.shape)}")
    with torch.autocast(device_type=images01.device.type, enabled=False):
        mask = keep_mask.to(device=images01.device, dtype=torch.float32).unsqueeze(1)
        spectrum = torch.fft.fftshift(torch.fft.fft2(images01.float()), dim=(-2, -1))
        filtered = torch.fft.ifft2(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1))).real
    return filtered.clamp(0.0, 1.0) if clamp else filtered
