"""MFM's frequency loss: the spectrum distance between prediction and target, on removed frequencies.

Following the official FrequencyLoss (adapted from focal frequency loss) with patch_factor 1 and
RECOVER_TARGET_TYPE 'masked', the setting of every released MFM config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12  # inside the sqrt, so identical spectra give a distance of 1e-6, not 0


@dataclass(frozen=True)
class FocalWeighting:
    """Focal-frequency-loss spectrum weights; off (None) in every released MFM config.

    matrix_gamma: exponent on the per-frequency distance; log_matrix: use log(1 + w);
    batch_matrix: normalise by the batch max instead of each (image, channel)'s max.
    """

    matrix_gamma: float = 1.0
    log_matrix: bool = False
    batch_matrix: bool = False


def spectrum(images: torch.Tensor) -> torch.Tensor:
    """Complex fftshift(fft2(x, norm="ortho")) over the last two axes, computed in float32.

    The orthonormal FFT preserves energy (Parseval), so squared spectrum distances equal pixel ones.
    """
    with torch.autocast(device_type=images.device.type, enabled=False):
        return torch.fft.fftshift(torch.fft.fft2(images.float(), norm="ortho"), dim=(-2, -1))


@torch.no_grad()
def focal_weights(difference: torch.Tensor, focal: FocalWeighting) -> torch.Tensor:
    """Detached weights in [0, 1] from a complex spectrum difference [B, C, H, W].

    |dF| ** matrix_gamma (optionally log(1 + .)), divided by its max per (image, channel) or over
    the batch; 0 / 0 (identical spectra) gives 0. The largest distance gets weight 1.
    """
    weights = torch.sqrt(difference.real**2 + difference.imag**2) ** focal.matrix_gamma
    if focal.log_matrix:
        weights = torch.log(weights + 1.0)
    if focal.batch_matrix:
        weights = weights / weights.max()
    else:
        weights = weights / weights.amax(dim=(-2, -1), keepdim=True)
    weights = torch.where(torch.isnan(weights), torch.zeros_like(weights), weights)
    return weights.clamp(0.0, 1.0)


def frequency_distance(
    pred: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 1.0,
    focal: FocalWeighting | None = None,
) -> torch.Tensor:
    """Per-frequency distance sqrt(|F(pred) - F(target)|^2 + 1e-12) ** gamma, [B, C, H, W] float32.

    A non-squared complex modulus for gamma = 1 (the released setting); gamma = 2 gives the squared
    error. Runs in float32 with autocast off. `focal` multiplies by detached `focal_weights`.
    """
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(
            f"pred and target must both be [B, C, H, W], got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    with torch.autocast(device_type=pred.device.type, enabled=False):
        difference = spectrum(pred) - spectrum(target)
        distance = torch.sqrt(difference.real**2 + difference.imag**2 + _EPS) ** gamma
        if focal is not None:
            distance = distance * focal_weights(difference, focal)
    return distance


def mfm_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    keep_mask: torch.Tensor,
    gamma: float = 1.0,
    focal: FocalWeighting | None = None,
) -> torch.Tensor:
    """Mean frequency distance over the removed (image, frequency) pairs of the batch, and channels.

    L = sum_{b,c,u,v} (1 - M_b(u,v)) d_{b,c,u,v} / (C * sum_{b,u,v} (1 - M_b(u,v))).
    One global average, as the official code: a high-pass image (few removed frequencies)
    weighs less than a low-pass one, unlike a mean of per-image means. pred/target: [B, C, H, W]
    (normalised pixels), keep_mask: binary [B, H, W] with 1 = kept in the corrupted input.
    With nothing removed the loss is a zero that still depends on pred (no NaN, no host sync).
    """
    distance = frequency_distance(pred, target, gamma=gamma, focal=focal)
    batch, channels, height, width = distance.shape
    if tuple(keep_mask.shape) != (batch, height, width):
        raise ValueError(f"keep_mask must be [{batch}, {height}, {width}], got {tuple(keep_mask.shape)}")
    removed = 1.0 - keep_mask.to(device=distance.device, dtype=torch.float32)
    total = (distance * removed.unsqueeze(1)).sum()
    # The mask is binary, so the count is an integer: clamping to 1 only changes the empty case (0 / 1).
    return total / (channels * removed.sum().clamp(min=1.0))
