"""Each knob degrades images with the code training runs, configured as the objective configures it."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_dir

import ssl.analyze.degradations as degradations
import ssl.data.device_augment as device_augment
import ssl.data.device_crops as device_crops
import ssl.data.masking as masking
import ssl.objectives.mfm as mfm_module
from ssl.analyze.degradations import objective_degradations
from ssl.backbones.factory import build_backbone
from ssl.config import CONFIG_DIR
from ssl.data.frequency import FrequencyMasker, frequency_corrupt
from ssl.objectives import build_objective

OWN_KNOB = {"mae": "mask_ratio", "data2vec": "block_mask_ratio", "mfm": "frequency_radius",
            "dino": "local_crop_scale", "coke": "global_crop_scale"}


def objective_and_knobs(name: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("analyze/degradation", overrides=[f"objective={name}", "+backbone.kwargs.depth=1"])
    node = cfg.objective[name]
    if "num_samples" in node and node.num_samples is None:
        node.num_samples = 100
    backbone = build_backbone(cfg.backbone)
    objective = build_objective(name, node, backbone)
    knobs = objective_degradations(objective.batch_maskers(), objective.view_spec(), cfg.dataset,
                                   backbone.patch_size)
    return cfg, objective, knobs


def images(count: int = 6, size: int = 28) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", sorted(OWN_KNOB))
def test_each_objective_offers_its_own_degradation_first_and_photometric_ones(name: str) -> None:
    _, _, knobs = objective_and_knobs(name)
    assert next(iter(knobs)) == OWN_KNOB[name]
    assert {"color_jitter", "blur_sigma", "solarize_prob", "grayscale_prob"} <= set(knobs)
    x = images()
    for knob in knobs.values():
        out = knob.apply(x, knob.grid[len(knob.grid) // 2], 0)
        assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0, knob.knob


def test_mask_ratio_knob_paints_exactly_the_patches_maes_masker_removes() -> None:
    cfg, mae, knobs = objective_and_knobs("mae")
    (masker,) = mae.batch_maskers()
    knob = knobs["mask_ratio"]
    assert knob.default == cfg.objective.mae.mask_ratio == masker.mask_ratio
    x = torch.ones(4, 3, 28, 28)
    out = knob.apply(x, knob.default, seed=5)
    expected = masker(4, torch.Generator().manual_seed(5))[masker.mask_key]  # 1 = removed
    painted = (out < 1.0).view(4, 3, 7, 4, 7, 4).all(dim=(1, 3, 5)).flatten(1).float()
    assert torch.equal(painted, expected)


def test_mask_knob_draws_through_the_training_masking_function() -> None:
    _, _, knobs = objective_and_knobs("mae")
    with mock.patch.object(masking, "random_token_mask", wraps=masking.random_token_mask) as spy:
        knobs["mask_ratio"].apply(images(), 0.5, 0)
    assert spy.call_count == 1 and spy.call_args.args[2] == 0.5


def test_block_mask_knob_is_data2vecs_block_masking() -> None:
    _, d2v, knobs = objective_and_knobs("data2vec")
    (masker,) = d2v.batch_maskers()
    knob = knobs["block_mask_ratio"]
    gen = masker.generator
    assert knob.default == pytest.approx(gen.num_masked / (gen.height * gen.width))
    x = torch.ones(3, 3, 28, 28)
    out = knob.apply(x, knob.default, seed=2)
    expected = masker(3, torch.Generator().manual_seed(2))[masker.mask_key]
    painted = (out < 1.0).view(3, 3, 7, 4, 7, 4).all(dim=(1, 3, 5)).flatten(1)
    assert torch.equal(painted, expected)


def test_frequency_knob_is_mfms_masker_and_corruption() -> None:
    _, mfm, knobs = objective_and_knobs("mfm")
    (masker,) = mfm.batch_maskers()
    assert isinstance(masker, FrequencyMasker)
    knob = knobs["frequency_radius"]
    assert knob.default == masker.radius
    x = images()
    expected = frequency_corrupt(x, masker(len(x), torch.Generator().manual_seed(3))[masker.key])
    assert torch.equal(knob.apply(x, knob.default, 3), expected)
    # The same function objects training calls, not copies.
    assert degradations.frequency_corrupt is mfm_module.frequency_corrupt
    low = knobs["lowpass_radius"].apply(x, 2.0, 0)
    high = knobs["highpass_radius"].apply(x, 2.0, 0)
    assert not torch.allclose(low, high)


def test_crop_and_photometric_knobs_use_the_device_augmentation_path() -> None:
    assert degradations.resized_crops is device_crops.resized_crops
    assert degradations.draw_box is device_crops.draw_box
    assert degradations.apply_photometric is device_augment.apply_photometric
    _, _, knobs = objective_and_knobs("dino")
    crop_spy = mock.patch.object(degradations, "resized_crops", wraps=device_crops.resized_crops)
    photo_spy = mock.patch.object(degradations, "apply_photometric", wraps=device_augment.apply_photometric)
    with crop_spy as crops, photo_spy as photo:
        knobs["local_crop_scale"].apply(images(), 0.2, 0)
        knobs["color_jitter"].apply(images(), 0.4, 0)
    assert crops.call_count == 1 and crops.call_args.args[2] == 12  # cut at the local crop size
    assert photo.call_count == 1


def test_full_crop_and_zero_strength_photometrics_are_the_identity() -> None:
    _, _, knobs = objective_and_knobs("dino")
    x = images()
    whole = knobs["global_crop_scale"].apply(x, 1.0, 0)
    for i in range(len(x)):
        assert torch.allclose(whole[i], x[i], atol=1e-5) or torch.allclose(whole[i], x[i].flip(-1), atol=1e-5)
    assert torch.allclose(knobs["color_jitter"].apply(x, 0.0, 0), x, atol=1e-6)
    assert torch.allclose(knobs["solarize_prob"].apply(x, 0.0, 0), x, atol=1e-6)
    gray = knobs["grayscale_prob"].apply(x, 1.0, 0)
    assert torch.allclose(gray[:, 0], gray[:, 1]) and torch.allclose(gray[:, 1], gray[:, 2])
    solarized = knobs["solarize_prob"].apply(x, 1.0, 0)
    assert torch.allclose(solarized, torch.where(x >= 128 / 255, 1 - x, x), atol=1e-6)


def test_degradation_is_reproducible_from_its_seed() -> None:
    _, _, knobs = objective_and_knobs("coke")
    x = images()
    for name in ("global_crop_scale", "color_jitter", "solarize_prob"):  # blur at a fixed sigma draws nothing
        a, b = knobs[name].apply(x, knobs[name].grid[2], 7), knobs[name].apply(x, knobs[name].grid[2], 7)
        assert torch.equal(a, b), name
        assert not torch.equal(a, knobs[name].apply(x, knobs[name].grid[2], 8)), name


def test_strength_outside_the_range_names_the_range_and_the_grid() -> None:
    _, _, knobs = objective_and_knobs("mae")
    with pytest.raises(ValueError, match=r"mask_ratio's range \(0, 1\).*default grid"):
        knobs["mask_ratio"].check([0.5, 1.0])
    knobs["mask_ratio"].check([0.5, 0.9])
