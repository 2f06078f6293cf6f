"""Label-information and consistency measures on inputs whose answer is known."""

from __future__ import annotations

import math

import pytest
import torch

from ssl.analyze.measures import (
    agreement,
    chance_accuracy,
    class_pair_cosines,
    entropy_bits,
    mutual_information_bits,
    paired_cosine,
)


def test_mutual_information_of_a_copy_is_its_entropy_and_of_independent_labels_is_near_zero() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 4, (20000,), generator=g)
    assert mutual_information_bits(a, a, 4) == pytest.approx(entropy_bits(a, 4), abs=1e-9)
    assert entropy_bits(a, 4) == pytest.approx(2.0, abs=0.01)
    b = torch.randint(0, 4, (20000,), generator=g)
    assert mutual_information_bits(a, b, 4) < 0.01
    # A relabelling loses nothing: I is invariant to a permutation of one side's classes.
    assert mutual_information_bits(a, (a + 1) % 4, 4) == pytest.approx(entropy_bits(a, 4), abs=1e-9)


def test_agreement_and_chance() -> None:
    a = torch.tensor([0, 1, 2, 3])
    assert agreement(a, torch.tensor([0, 1, 0, 0])) == 50.0
    assert chance_accuracy(torch.tensor([0, 0, 0, 1])) == 75.0


def test_paired_cosine() -> None:
    x = torch.randn(10, 5)
    assert paired_cosine(x, 3 * x) == pytest.approx(1.0, abs=1e-6)
    assert paired_cosine(x, -x) == pytest.approx(-1.0, abs=1e-6)


def test_class_pair_cosines_separate_same_from_different_class() -> None:
    """Two orthogonal class directions plus small noise: same class ~1, different class ~0."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    directions = torch.eye(2, 16)
    x = directions[labels] + 0.01 * torch.randn(400, 16, generator=g)
    cos = class_pair_cosines(x, labels, 500, torch.Generator().manual_seed(1))
    assert cos["same_class"] > 0.99
    assert abs(cos["different_class"]) < 0.05


def test_class_pair_cosines_without_a_second_class_is_nan() -> None:
    cos = class_pair_cosines(torch.randn(20, 3), torch.zeros(20, dtype=torch.long), 10,
                             torch.Generator().manual_seed(0))
    assert math.isnan(cos["different_class"]) and not math.isnan(cos["same_class"])
