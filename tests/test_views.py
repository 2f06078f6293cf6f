"""Multi-crop and evaluation transforms: shapes, normalisation, randomness, determinism."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from ssl.data.views import (
    MultiCropTransform,
    RandomGaussianBlur,
    RandomSolarize,
    ToNormalizedTensor,
    blur_radius_range,
    eval_transform,
)

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.286, 0.286, 0.286), (0.353, 0.353, 0.353)


def random_image(width: int = 28, height: int = 28, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "num_global, num_local, global_size, local_size, image_size",
    [
        (2, 8, 28, 12, 28),
        (2, 0, 28, 12, 28),
        (1, 0, 32, 16, 32),
        (3, 4, 32, 16, 40),
        (2, 2, 96, 40, 96),
        (2, 1, 224, 96, 150),
    ],
)
def test_crop_count_and_shapes(
    num_global: int, num_local: int, global_size: int, local_size: int, image_size: int
) -> None:
    transform = MultiCropTransform(num_global, num_local, global_size, local_size, mean=MEAN, std=STD)
    crops = transform(random_image(image_size, image_size))
    assert isinstance(crops, list) and len(crops) == num_global + num_local
    for i, crop in enumerate(crops):
        size = global_size if i < num_global else local_size
        assert crop.shape == (3, size, size) and crop.dtype == torch.float32
        assert crop.is_contiguous() and torch.isfinite(crop).all()


def test_crops_are_normalised() -> None:
    transform = MultiCropTransform(2, 6, 28, 12, mean=MEAN, std=STD)
    lo, hi = (0 - MEAN[0]) / STD[0], (1 - MEAN[0]) / STD[0]
    for crop in transform(random_image()):
        assert lo - 1e-5 <= crop.min() and crop.max() <= hi + 1e-5
        assert crop.min() < 0  # centred, not [0, 1]


def test_randomness_and_seeding() -> None:
    transform = MultiCropTransform(2, 4, 28, 12, mean=MEAN, std=STD)
    image = random_image()
    a, b = transform(image), transform(image)
    assert any(not torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1])  # the two global views differ too
    torch.manual_seed(123)
    c = transform(image)
    torch.manual_seed(123)
    d = transform(image)
    assert all(torch.equal(x, y) for x, y in zip(c, d))


def test_dino_recipe_per_crop() -> None:
    transform = MultiCropTransform(3, 2, 28, 12)

    def extras(pipeline: T.Compose) -> list[tuple[str, float]]:
        return [
            (type(t).__name__, t.p)
            for t in pipeline.transforms
            if isinstance(t, (RandomGaussianBlur, RandomSolarize))
        ]

    assert extras(transform.global_first) == [("RandomGaussianBlur", 1.0)]
    assert extras(transform.global_other) == [("RandomGaussianBlur", 0.1), ("RandomSolarize", 0.2)]
    assert extras(transform.local) == [("RandomGaussianBlur", 0.5)]
    crop = transform.global_first.transforms[0]
    assert isinstance(crop, T.RandomResizedCrop)
    assert crop.interpolation == T.InterpolationMode.BICUBIC and crop.scale == (0.4, 1.0)
    assert transform.local.transforms[0].scale == (0.05, 0.4)


def test_blur_radius_scales_with_crop_size() -> None:
    assert blur_radius_range(224) == pytest.approx((0.1, 2.0))
    assert blur_radius_range(28) == pytest.approx((0.0125, 0.25))
    blur = MultiCropTransform(2, 2, 28, 12).global_first.transforms[4]
    assert (blur.radius_min, blur.radius_max) == pytest.approx((0.0125, 0.25))


def test_solarize_and_blur_primitives() -> None:
    image = Image.fromarray(np.array([[[0, 127, 128]], [[200, 255, 10]]], dtype=np.uint8))
    solarized = np.asarray(RandomSolarize(p=1.0)(image))
    np.testing.assert_array_equal(solarized, [[[0, 127, 127]], [[55, 0, 10]]])
    assert RandomSolarize(p=0.0)(image) is image
    assert RandomGaussianBlur(0.0, 0.1, 2.0)(image) is image
    flat = Image.new("RGB", (8, 8), (90, 90, 90))
    assert np.asarray(RandomGaussianBlur(1.0, 0.1, 2.0)(flat)).std() == 0


def test_from_config_and_pickling() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "fashion_mnist.yaml")
    transform = MultiCropTransform.from_config(cfg, num_global=2, num_local=3)
    crops = transform(random_image())
    assert [c.shape[-1] for c in crops] == [28, 28, 12, 12, 12]
    clone = pickle.loads(pickle.dumps(transform))  # DataLoader workers may pickle it
    assert len(clone(random_image())) == 5


def test_invalid_counts() -> None:
    with pytest.raises(ValueError):
        MultiCropTransform(num_global=0)
    with pytest.raises(ValueError):
        MultiCropTransform(num_local=-1)


def test_fused_normalisation_matches_torchvision() -> None:
    image = random_image(20, 12)
    reference = T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(image)
    torch.testing.assert_close(ToNormalizedTensor(MEAN, STD)(image), reference)
    gray = image.convert("L")
    assert ToNormalizedTensor(MEAN, STD)(gray).shape == (3, 12, 20)


@pytest.mark.parametrize(
    "image_size, width, height",
    [(28, 28, 28), (28, 40, 30), (32, 32, 32), (96, 96, 96), (224, 400, 300), (64, 50, 80)],
)
def test_eval_transform_shape_and_determinism(image_size: int, width: int, height: int) -> None:
    transform = eval_transform(image_size, MEAN, STD)
    image = random_image(width, height)
    out = transform(image)
    assert out.shape == (3, image_size, image_size) and out.dtype == torch.float32
    assert torch.equal(out, transform(image))


def test_eval_transform_leaves_right_sized_small_images_alone() -> None:
    image = random_image(28, 28)
    out = eval_transform(28, MEAN, STD)(image)
    torch.testing.assert_close(out, T.Compose([T.ToTensor(), T.Normalize(MEAN, STD)])(image))
    big = eval_transform(224, MEAN, STD).transforms
    assert isinstance(big[0], T.Resize) and big[0].size == 256
    assert isinstance(big[1], T.CenterCrop)
