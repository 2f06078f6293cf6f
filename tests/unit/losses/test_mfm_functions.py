"""MFM's pure functions: frequency masks, spectrum corruption and the masked frequency loss.

Reference values and the oracle follow Jiahao000/MFM (FreqMaskGenerator, MFM.frequency_transform,
FrequencyLoss and the 'masked' normalisation in MFM.forward), re-derived here independently.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssl.data.frequency import FrequencyMasker, frequency_corrupt, lowpass_mask, scaled_radius
from ssl.losses.mfm import FocalWeighting, focal_weights, frequency_distance, mfm_loss, spectrum

# ---------------------------------------------------------------------------------------------
# Masks


@pytest.mark.parametrize(("radius", "count"), [(16, 793), (8, 193), (32, 3205)])
def test_mask_counts_at_224(radius: int, count: int) -> None:
    low = lowpass_mask(224, 224, radius)
    assert low.dtype == torch.bool and low.shape == (224, 224)
    assert int(low.sum()) == count
    always_low = FrequencyMasker(224, radius, lowpass_prob=1.0)(1)["frequency_mask"][0]
    always_high = FrequencyMasker(224, radius, lowpass_prob=0.0)(1)["frequency_mask"][0]
    assert torch.equal(always_low, low.float())
    assert int(always_high.sum()) == 224 * 224 - count
    assert torch.equal(always_low + always_high, torch.ones(224, 224))
    # Centre (112, 112): the disc reaches radius - 1 on each side of it and no further.
    assert low[112, 112] and not always_high[112, 112]
    for dy, dx in [(radius - 1, 0), (-(radius - 1), 0), (0, radius - 1), (0, -(radius - 1))]:
        assert low[112 + dy, 112 + dx]
    for dy, dx in [(radius, 0), (-radius, 0), (0, radius), (0, -radius)]:
        assert not low[112 + dy, 112 + dx]


@pytest.mark.parametrize(("height", "width"), [(224, 224), (27, 27), (16, 21)])
def test_mask_centre_is_where_fftshift_puts_dc(height: int, width: int) -> None:
    shifted = torch.fft.fftshift(torch.fft.fft2(torch.ones(height, width, dtype=torch.float64)))
    dc = (shifted.abs() > 1e-6).nonzero()
    assert dc.tolist() == [[height // 2, width // 2]]
    only_dc = lowpass_mask(height, width, 1.0)  # d^2 < 1 holds at the centre only
    assert only_dc.nonzero().tolist() == dc.tolist()


def official_style_mask(size: int, radius1: float, radius2: float = 999) -> torch.Tensor:
    """The released generator's double loop: 0 where r1^2 <= d^2 < r2^2, 1 elsewhere."""
    mask = torch.ones(size, size)
    c = size // 2
    for y in range(size):
        for x in range(size):
            d2 = (x - c) ** 2 + (y - c) ** 2
            if radius1**2 <= d2 < radius2**2:
                mask[y, x] = 0
    return mask


@pytest.mark.parametrize(("size", "radius"), [(32, 5), (33, 4.5), (28, scaled_radius(28))])
def test_mask_matches_official_loop(size: int, radius: float) -> None:
    assert torch.equal(lowpass_mask(size, size, radius).float(), official_style_mask(size, radius))


def test_scaled_radius() -> None:
    assert scaled_radius(28) == 2.0
    assert scaled_radius(224) == 16.0
    assert scaled_radius(448, radius_at_224=8.0) == 16.0
    assert int(lowpass_mask(28, 28, scaled_radius(28)).sum()) == 9  # d^2 < 4: the centre and its 8 neighbours


def test_masker_rectangular_size_and_key() -> None:
    out = FrequencyMasker((16, 20), radius=3, lowpass_prob=0.5, key="fm")(5)
    assert set(out) == {"fm"}
    assert out["fm"].shape == (5, 16, 20) and out["fm"].dtype == torch.float32


@pytest.mark.parametrize("prob", [0.5, 0.3])
def test_bernoulli_choice_frequency(prob: float) -> None:
    generator = torch.Generator().manual_seed(1234)
    masks = FrequencyMasker(8, radius=2, lowpass_prob=prob)(10_000, generator=generator)["frequency_mask"]
    low = lowpass_mask(8, 8, 2).float()
    is_low = (masks == low).flatten(1).all(1)
    is_high = (masks == 1 - low).flatten(1).all(1)
    assert bool((is_low ^ is_high).all())  # each mask is exactly one of the two
    assert abs(is_low.float().mean().item() - prob) < 0.02


def test_masker_reproducible() -> None:
    masker = FrequencyMasker(16, radius=3, lowpass_prob=0.5)
    first = masker(64, generator=torch.Generator().manual_seed(7))["frequency_mask"]
    again = masker(64, generator=torch.Generator().manual_seed(7))["frequency_mask"]
    other = masker(64, generator=torch.Generator().manual_seed(8))["frequency_mask"]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Without a generator the global RNG is used, which is what DataLoader workers seed.
    torch.manual_seed(3)
    global_a = masker(64)["frequency_mask"]
    torch.manual_seed(3)
    global_b = masker(64)["frequency_mask"]
    assert torch.equal(global_a, global_b)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"radius": 4, "lowpass_prob": -0.1},
        {"radius": 4, "lowpass_prob": 1.5},
        {"radius": 0, "lowpass_prob": 0.5},
        {"radius": -2, "lowpass_prob": 0.5},
    ],
)
def test_masker_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        FrequencyMasker(16, **kwargs)


def test_mask_rejects_bad_size() -> None:
    with pytest.raises(ValueError):
        lowpass_mask(0, 16, 2.0)
    with pytest.raises(ValueError):
        scaled_radius(0)


# ---------------------------------------------------------------------------------------------
# Corruption


def test_identity_with_all_ones_mask() -> None:
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = frequency_corrupt(x, torch.ones(2, 224, 224))
    assert out.dtype == torch.float32
    assert (out - x).abs().max().item() < 1e-5


def test_highpass_removes_dc_and_lowpass_keeps_mean() -> None:
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    low = lowpass_mask(64, 64, 6).float().expand(2, 64, 64)
    high = 1 - low
    high_raw = frequency_corrupt(x, high, clamp=False)
    assert high_raw.mean(dim=(-2, -1)).abs().max().item() < 1e-5
    assert high_raw.min().item() < -0.05  # a real negative half ...
    high_clamped = frequency_corrupt(x, high)
    assert high_clamped.min().item() >= 0.0 and high_clamped.max().item() <= 1.0
    assert high_clamped.mean().item() > 0.05  # ... that the clamp throws away, as in the official code
    low_raw = frequency_corrupt(x, low, clamp=False)
    assert torch.allclose(low_raw.mean(dim=(-2, -1)), x.mean(dim=(-2, -1)), atol=1e-5)
    assert (low_raw - x).abs().max().item() > 0.1  # but the image itself did change


def test_masks_are_per_image_and_shared_over_channels() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    masks = torch.stack([torch.ones(32, 32), lowpass_mask(32, 32, 4).float()])
    out = frequency_corrupt(x, masks, clamp=False)
    assert (out[0] - x[0]).abs().max().item() < 1e-5
    single = frequency_corrupt(x[1:, :1], masks[1:], clamp=False)
    assert torch.allclose(out[1:, :1], single, atol=1e-6)


def test_corruption_matches_unshifted_oracle() -> None:
    # Independent route: mask the unshifted spectrum with ifftshift(M) instead of shifting the spectrum.
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 3, 28, 28, generator=gen, dtype=torch.float64)
    masks = FrequencyMasker(28, scaled_radius(28) * 2, 0.5)(4, generator=gen)["frequency_mask"]
    oracle = torch.fft.ifft2(torch.fft.fft2(x) * torch.fft.ifftshift(masks, dim=(-2, -1))[:, None]).real
    oracle = oracle.clamp(0, 1)
    assert torch.allclose(frequency_corrupt(x, masks).double(), oracle, atol=1e-5)


def test_corruption_runs_in_float32_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    mask = lowpass_mask(28, 28, 5).float().expand(2, 28, 28)
    expected = frequency_corrupt(x.bfloat16().float(), mask)
    seen: list[tuple[bool, torch.dtype]] = []
    fft2 = torch.fft.fft2

    def spy(inp: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        seen.append((torch.is_autocast_enabled("cpu"), inp.dtype))
        return fft2(inp, *args, **kwargs)

    monkeypatch.setattr(torch.fft, "fft2", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = frequency_corrupt(x.bfloat16(), mask)
    assert out.dtype == torch.float32
    assert seen == [(False, torch.float32)]
    assert torch.equal(out, expected)


def test_corruption_rejects_wrong_mask_shape() -> None:
    with pytest.raises(ValueError):
        frequency_corrupt(torch.rand(2, 3, 8, 8), torch.ones(2, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# Loss


def _pair(shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def test_loss_floor_is_sqrt_eps() -> None:
    x, _ = _pair((2, 3, 32, 32), 10)
    distance = frequency_distance(x, x.clone())
    assert distance.shape == (2, 3, 32, 32) and distance.dtype == torch.float32
    assert torch.allclose(distance, torch.full_like(distance, 1e-6), rtol=1e-5, atol=0)
    masks = FrequencyMasker(32, 4, 0.5)(2, generator=torch.Generator().manual_seed(0))["frequency_mask"]
    assert mfm_loss(x, x.clone(), masks).item() == pytest.approx(1e-6, rel=1e-5)


def test_parseval_gamma2_all_removed_equals_pixel_mse() -> None:
    pred, target = _pair((3, 3, 24, 24), 11)
    loss = mfm_loss(pred, target, torch.zeros(3, 24, 24), gamma=2.0)
    mse = ((pred.double() - target.double()) ** 2).mean().item() + 1e-12
    assert loss.item() == pytest.approx(mse, rel=1e-5)
    # gamma = 1 is the non-squared modulus: strictly smaller than the RMS error (Jensen), not the MSE.
    plain = mfm_loss(pred, target, torch.zeros(3, 24, 24)).item()
    assert plain < math.sqrt(mse) * 0.999


def test_constant_offset_lives_only_in_dc() -> None:
    # pred - target = 0.5 everywhere: only DC differs, by 0.5 * sqrt(H W) under the ortho FFT.
    target, _ = _pair((1, 1, 16, 16), 12)
    pred = target + 0.5
    low = lowpass_mask(16, 16, 3).float()[None]
    # DC kept, so unsupervised: only the 1e-6 floor is left (plus float32 FFT round-off of ~1e-7).
    assert mfm_loss(pred, target, low).item() == pytest.approx(1e-6, rel=2e-2)
    removed = int(low.sum())  # the high-pass mask removes these, DC among them
    expected = (0.5 * 16 + (removed - 1) * 1e-6) / removed
    assert mfm_loss(pred, target, 1 - low).item() == pytest.approx(expected, rel=1e-5)


def test_global_normalisation_over_removed_pairs() -> None:
    gen = torch.Generator().manual_seed(13)
    target = torch.randn(2, 3, 16, 16, generator=gen)
    noise = torch.randn(2, 3, 16, 16, generator=gen) * torch.tensor([1.0, 0.1]).view(2, 1, 1, 1)
    pred = target + noise
    low = lowpass_mask(16, 16, 3).float()
    masks = torch.stack([low, 1 - low])  # image 0 low-pass (many removed), image 1 high-pass (few)

    numerator, denominator, per_image = 0.0, 0.0, []
    for b in range(2):
        diff = torch.fft.fftshift(
            torch.fft.fft2(pred[b].double(), norm="ortho") - torch.fft.fft2(target[b].double(), norm="ortho"),
            dim=(-2, -1),
        )
        dist = torch.sqrt(diff.real**2 + diff.imag**2 + 1e-12)
        removed = 1 - masks[b].double()
        numerator += (dist * removed).sum().item()
        denominator += 3 * removed.sum().item()
        per_image.append((dist * removed).sum().item() / (3 * removed.sum().item()))
    expected = numerator / denominator

    loss = mfm_loss(pred, target, masks).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    mean_of_means = sum(per_image) / 2
    assert abs(loss - mean_of_means) / loss > 0.2


def test_nothing_removed_is_zero_with_gradient() -> None:
    pred, target = _pair((2, 3, 8, 8), 14)
    pred.requires_grad_(True)
    loss = mfm_loss(pred, target, torch.ones(2, 8, 8))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))


def test_gradient_flows_to_pred_only() -> None:
    pred, target = _pair((2, 3, 16, 16), 15)
    pred.requires_grad_(True)
    masks = FrequencyMasker(16, 3, 0.5)(2, generator=torch.Generator().manual_seed(1))["frequency_mask"]
    mfm_loss(pred, target, masks).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    assert target.grad is None
    # Even at pred == target the gradient is finite (the 1e-12 keeps the sqrt away from 0).
    same = target.clone().requires_grad_(True)
    mfm_loss(same, target, masks).backward()
    assert torch.isfinite(same.grad).all()


def test_loss_runs_in_float32_under_autocast() -> None:
    pred, target = _pair((2, 3, 28, 28), 16)
    masks = torch.zeros(2, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        distance = frequency_distance(pred.bfloat16(), target.bfloat16())
        loss = mfm_loss(pred.bfloat16(), target.bfloat16(), masks)
    assert distance.dtype == torch.float32 and loss.dtype == torch.float32
    expected = mfm_loss(pred.bfloat16().float(), target.bfloat16().float(), masks)
    assert torch.equal(loss, expected)


def test_loss_rejects_bad_shapes() -> None:
    pred, target = _pair((2, 3, 8, 8), 17)
    with pytest.raises(ValueError):
        frequency_distance(pred, target[:, :2])
    with pytest.raises(ValueError):
        mfm_loss(pred, target, torch.ones(2, 1, 8, 8))


# ---------------------------------------------------------------------------------------------
# Focal weighting (off in every released config, kept for completeness)


@pytest.mark.parametrize(
    "focal",
    [FocalWeighting(), FocalWeighting(matrix_gamma=2.0, log_matrix=True), FocalWeighting(batch_matrix=True)],
)
def test_focal_weights(focal: FocalWeighting) -> None:
    pred, target = _pair((2, 3, 16, 16), 18)
    pred = pred * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)  # image 1 errs more than image 0
    difference = spectrum(pred) - spectrum(target)
    weights = focal_weights(difference, focal)
    assert not weights.requires_grad
    assert weights.min().item() >= 0.0 and weights.max().item() <= 1.0
    modulus = difference.abs()
    if focal.batch_matrix:
        assert weights.flatten()[modulus.flatten().argmax()].item() == pytest.approx(1.0)
        assert weights[0].max().item() < 0.9  # the weaker image never reaches 1
    else:
        per_slice_max = weights.flatten(2).gather(2, modulus.flatten(2).argmax(2, keepdim=True))
        assert torch.allclose(per_slice_max, torch.ones_like(per_slice_max))
    masks = torch.zeros(2, 16, 16)
    assert mfm_loss(pred, target, masks, focal=focal) < mfm_loss(pred, target, masks)


def test_focal_weights_zero_when_identical() -> None:
    x, _ = _pair((1, 3, 8, 8), 19)
    weights = focal_weights(spectrum(x) - spectrum(x), FocalWeighting())
    assert torch.equal(weights, torch.zeros_like(weights))  # 0 / 0 -> 0, not NaN
    assert mfm_loss(x, x, torch.zeros(1, 8, 8), focal=FocalWeighting()).item() == 0.0


# ---------------------------------------------------------------------------------------------
# Oracle: the official FrequencyLoss (patch_factor 1) and masked normalisation, written out afresh


def oracle_masked_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    keep: torch.Tensor,
    loss_gamma: float,
    with_matrix: bool,
    matrix_gamma: float = 1.0,
    log_matrix: bool = False,
    batch_matrix: bool = False,
) -> torch.Tensor:
    def to_freq(x: torch.Tensor) -> torch.Tensor:  # [N, P=1, C, H, W, 2] with (real, imag) last
        patches = x.unsqueeze(1).double()
        f = torch.fft.fftshift(torch.fft.fft2(patches, norm="ortho"), dim=(-2, -1))
        return torch.stack([f.real, f.imag], dim=-1)

    sq = (to_freq(pred) - to_freq(target)) ** 2
    loss = torch.sqrt(sq[..., 0] + sq[..., 1] + 1e-12) ** loss_gamma
    if with_matrix:
        w = torch.sqrt(sq[..., 0] + sq[..., 1]) ** matrix_gamma
        if log_matrix:
            w = torch.log(w + 1.0)
        if batch_matrix:
            w = w / w.max()
        else:
            w = w / w.max(-1).values.max(-1).values[:, :, :, None, None]
        w[torch.isnan(w)] = 0.0
        loss = w.clamp(0.0, 1.0) * loss
    keep = keep.double().unsqueeze(1)  # [N, 1, H, W], as in MFM.forward
    in_chans, patches = pred.shape[1], loss.shape[1]
    return (loss * (1 - keep.unsqueeze(1))).sum() / (1 - keep).sum() / in_chans / patches


@pytest.mark.parametrize(
    "options",
    [
        {"loss_gamma": 1.0, "with_matrix": False},
        {"loss_gamma": 2.0, "with_matrix": False},
        {"loss_gamma": 1.0, "with_matrix": True},
        {"loss_gamma": 1.0, "with_matrix": True, "matrix_gamma": 2.0, "log_matrix": True},
        {"loss_gamma": 1.5, "with_matrix": True, "batch_matrix": True},
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_official_oracle(options: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(100 + seed)
    pred = torch.randn(4, 3, 24, 24, generator=gen)
    target = torch.randn(4, 3, 24, 24, generator=gen)
    radius = float(torch.empty(1).uniform_(1.5, 8.0, generator=gen))
    masks = FrequencyMasker(24, radius, 0.5)(4, generator=gen)["frequency_mask"]
    if seed == 1:  # arbitrary binary masks, not just discs
        masks = (torch.rand(4, 24, 24, generator=gen) < 0.4).float()
    focal = None
    if options["with_matrix"]:
        focal = FocalWeighting(
            matrix_gamma=options.get("matrix_gamma", 1.0),
            log_matrix=options.get("log_matrix", False),
            batch_matrix=options.get("batch_matrix", False),
        )
    ours = mfm_loss(pred, target, masks, gamma=options["loss_gamma"], focal=focal)
    expected = oracle_masked_loss(pred, target, masks, **options)
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
