"""A sweep's measures where the answer is known: the identity keeps everything, noise keeps nothing."""

from __future__ import annotations

import pytest
import torch

from ssl.analyze.degradations import Degradation
from ssl.analyze.strength_sweep import Reference, SweepSettings, normaliser, sweep_reference

CLASSES, SIDE = 10, 8


def class_images(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images: a random +-pattern per class around mid-grey, plus a little noise, so that in
    the normalised (zero-centred) pixels classes are nearly orthogonal."""
    fixed = torch.Generator().manual_seed(99)
    patterns = torch.randint(0, 2, (CLASSES, 3, SIDE, SIDE), generator=fixed) * 2 - 1
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % CLASSES
    images01 = 0.5 + 0.2 * patterns[labels] + 0.03 * torch.randn(count, 3, SIDE, SIDE, generator=g)
    return (images01.clamp(0, 1) * 255).round().to(torch.uint8), labels


def flat(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def reference() -> Reference:
    train, train_labels = class_images(500, seed=1)
    normalise = normaliser([0.5] * 3, [0.25] * 3)
    return Reference("pixels", flat, flat(normalise(train.float() / 255)), train_labels)


def knob(apply) -> Degradation:
    return Degradation("test", "a test degradation", 0.0, 1.0, (0.5,), None, apply)


SETTINGS = SweepSettings(k=10, linear=True, linear_lrs=(0.01, 0.1), linear_epochs=5, pairs=500,
                         chunk_size=128)


def test_identity_degradation_keeps_consistency_one_and_the_clean_accuracy() -> None:
    test, labels = class_images(300, seed=2)
    result = sweep_reference(reference(), test, labels, normaliser([0.5] * 3, [0.25] * 3),
                             knob(lambda x, s, seed: x), [0.0, 0.5], SETTINGS)
    clean = result["clean"]
    assert clean["knn_top1"] == 100.0  # well separated classes
    for row in result["rows"]:
        assert row["cos_clean_degraded"] == pytest.approx(1.0, abs=1e-5)
        assert row["cos_two_degradations"] == pytest.approx(1.0, abs=1e-5)
        assert row["knn_top1"] == clean["knn_top1"]
        assert row["linear_top1"] == clean["linear_top1"]
        assert row["knn_agreement"] == 100.0
        assert row["knn_mi_bits"] == pytest.approx(clean["knn_prediction_entropy_bits"], abs=1e-6)
        assert row["cos_same_class_degraded"] == pytest.approx(clean["cos_same_class"], abs=1e-5)


def test_noise_degradation_gives_chance_accuracy_and_between_image_similarity() -> None:
    test, labels = class_images(1000, seed=3)

    def noise(x: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        return torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))

    result = sweep_reference(reference(), test, labels, normaliser([0.5] * 3, [0.25] * 3),
                             knob(noise), [1.0], SETTINGS)
    clean, row = result["clean"], result["rows"][0]
    assert clean["cos_same_class"] > 0.8 and abs(clean["cos_different_class"]) < 0.1
    assert abs(row["knn_top1"] - clean["chance_top1"]) < 5.0
    assert abs(row["linear_top1"] - clean["chance_top1"]) < 5.0
    assert row["knn_mi_bits"] < 0.1  # the prediction on noise says nothing of the clean one
    # Noise moves an image as far as a different image is: to the different-class cosine.
    assert row["cos_clean_degraded"] == pytest.approx(clean["cos_different_class"], abs=0.05)
    assert row["cos_two_degradations"] == pytest.approx(clean["cos_different_class"], abs=0.05)


def test_degradation_draws_are_reproducible_and_independent_between_the_two_copies() -> None:
    test, labels = class_images(100, seed=4)
    seeds = []

    def record(x: torch.Tensor, strength: float, seed: int) -> torch.Tensor:
        seeds.append(seed)
        return x

    sweep_reference(reference(), test, labels, normaliser([0.5] * 3, [0.25] * 3), knob(record),
                    [0.1, 0.2], SweepSettings(linear=False, chunk_size=50))
    assert len(seeds) == 8 and len(set(seeds)) == 8  # 2 strengths x 2 copies x 2 chunks, all distinct
