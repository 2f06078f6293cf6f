"""Multi-crop and evaluation transforms: shapes, normalisation, randomness, determinism."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torchvision import transforms as T

from ssl.data.eval_transform import eval_transform
from ssl.data.multicrop import MultiCropTransform
from ssl.data.photometric import blur_radius_range
from ssl.data.pil_ops import RandomGaussianBlur, RandomSolarize, ToNormalizedTensor
from ssl.data.spec import CropRecipe
from ssl.objectives.coke import MULTI_VIEW_CROPS, SINGLE_VIEW_CROPS
from ssl.objectives.dino import DINO_CROPS

REPO = Path(__file__).resolve().parents[3]
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
    torch.manual_seed(0)  # a dark random crop exists for any seed's image, but not in every draw
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


def describe(pipeline: T.Compose) -> dict[str, Any]:
    """The augmentation settings of one built crop pipeline, read back from its transforms."""
    out: dict[str, Any] = {"blur": None, "solarize": None}
    for t in pipeline.transforms:
        if isinstance(t, T.RandomResizedCrop):
            out["scale"] = tuple(t.scale)
        elif isinstance(t, T.RandomApply):
            (jitter,) = t.transforms
            assert isinstance(jitter, T.ColorJitter)
            ranges = (jitter.brightness, jitter.contrast, jitter.saturation)
            bcs = [0.0 if r is None else r[1] - 1 for r in ranges]
            out["jitter"] = pytest.approx((*bcs, 0.0 if jitter.hue is None else jitter.hue[1]))
            out["jitter_p"] = t.p
        elif isinstance(t, T.RandomGrayscale):
            out["gray"] = t.p
        elif isinstance(t, RandomGaussianBlur):
            out["blur"] = t.p
        elif isinstance(t, RandomSolarize):
            out["solarize"] = t.p
    return out


def expected(
    scale: tuple[float, float], jitter: tuple[float, ...], blur: float, solarize: float | None = None
) -> dict[str, Any]:
    """Every recipe jitters with p=0.8 and grays with p=0.2; solarize None = not in the pipeline."""
    return dict(scale=scale, jitter=jitter, jitter_p=0.8, gray=0.2, blur=blur, solarize=solarize)


WEAK, STRONG = (0.4, 0.4, 0.2, 0.1), (0.8, 0.8, 0.8, 0.2)


@pytest.mark.parametrize(
    "recipe, global_scale, local_scale, first, other, local",
    [
        (  # DINO, the dataset's scales
            DINO_CROPS, None, None,
            expected((0.4, 1.0), WEAK, 1.0),
            expected((0.4, 1.0), WEAK, 0.1, 0.2),
            expected((0.05, 0.4), WEAK, 0.5),
        ),
        (  # CoKe single view (a second global, if asked for, is alike)
            SINGLE_VIEW_CROPS, (0.08, 1.0), None,
            expected((0.08, 1.0), STRONG, 0.5),
            expected((0.08, 1.0), STRONG, 0.5),
            expected((0.05, 0.4), STRONG, 0.5),
        ),
        (  # CoKe two / multi view: BYOL's asymmetric pair + strongly jittered small crops
            MULTI_VIEW_CROPS, (0.08, 1.0), (0.05, 0.6),
            expected((0.08, 1.0), WEAK, 1.0),
            expected((0.08, 1.0), WEAK, 0.1, 0.2),
            expected((0.05, 0.6), STRONG, 0.5),
        ),
    ],
)
def test_recipes_build_the_stated_pipelines(
    recipe: CropRecipe,
    global_scale: tuple[float, float] | None,
    local_scale: tuple[float, float] | None,
    first: dict[str, Any],
    other: dict[str, Any],
    local: dict[str, Any],
) -> None:
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "fashion_mnist.yaml")
    transform = MultiCropTransform.from_config(cfg, 2, 4, recipe, global_scale, local_scale)
    assert describe(transform.global_first) == first
    assert describe(transform.global_other) == other
    assert describe(transform.local) == local
    assert transform.recipe is recipe and f"recipe={recipe.name!r}" in repr(transform)
    crops = transform(random_image())
    assert [c.shape[-1] for c in crops] == [28, 28, 12, 12, 12, 12]


def test_dino_default_matches_the_reference_pipeline() -> None:
    """The default recipe draws exactly the crops of DINO's hand-written pipeline, seed for seed."""
    to_tensor = ToNormalizedTensor(MEAN, STD)

    def reference(size: int, scale: tuple[float, float], tail: list[Any]) -> T.Compose:
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            *tail,
            to_tensor,
        ])

    g, lo = blur_radius_range(28), blur_radius_range(12)
    references = [
        reference(28, (0.4, 1.0), [RandomGaussianBlur(1.0, *g)]),
        reference(28, (0.4, 1.0), [RandomGaussianBlur(0.1, *g), RandomSolarize(0.2)]),
        reference(12, (0.05, 0.4), [RandomGaussianBlur(0.5, *lo)]),
    ]
    default = MultiCropTransform(2, 2, 28, 12, mean=MEAN, std=STD)
    named = MultiCropTransform(2, 2, 28, 12, mean=MEAN, std=STD, recipe=DINO_CROPS)
    assert default.recipe.name == "multicrop" and named.recipe.name == "dino"
    image = random_image(40, 40)
    for built, ref in zip((default.global_first, default.global_other, default.local), references):
        for seed in range(20):
            torch.manual_seed(seed)
            a = built(image)
            torch.manual_seed(seed)
            assert torch.equal(a, ref(image))
    torch.manual_seed(7)
    a = default(image)
    torch.manual_seed(7)
    assert all(torch.equal(x, y) for x, y in zip(a, named(image)))


def test_custom_recipes() -> None:
    custom = CropRecipe((0.1, 0.1, 0.1, 0.0), 0.0, 0.0, 0.0, (0.2, 0.2, 0.2, 0.0), 0.0, name="custom")
    transform = MultiCropTransform(2, 1, 28, 12, recipe=custom)
    assert "recipe='custom'" in repr(transform)
    assert describe(transform.global_other)["blur"] is None and describe(transform.local)["solarize"] is None
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        CropRecipe(WEAK, 1.5, 0.1, 0.2, WEAK, 0.5)


def test_from_config_scale_overrides() -> None:
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / "fashion_mnist.yaml")
    kept = MultiCropTransform.from_config(cfg, 2, 2)
    assert (kept.global_scale, kept.local_scale) == ((0.4, 1.0), (0.05, 0.4))
    assert kept.recipe == CropRecipe() == dataclasses.replace(DINO_CROPS, name="multicrop")
    only_local = MultiCropTransform.from_config(cfg, 2, 2, local_scale=[0.05, 0.6])
    assert (only_local.global_scale, only_local.local_scale) == ((0.4, 1.0), (0.05, 0.6))


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
