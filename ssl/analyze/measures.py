"""What survives a degradation, measured on features: pure functions of tensors.

Two families. *Label information*: a classifier fit on clean training features (k-NN bank, linear
probe) scored on degraded test images, and how much its predictions on degraded images still say
about its predictions on the clean ones (agreement, mutual information). *View consistency*:
cosine similarity between an image's clean and degraded features and between two independent
degradations, read against the cosine between different images of the same class and of
different classes, so "how far a degradation moves an image" has a scale.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl.eval.knn_classifier import knn_predict_scores
from ssl.eval.linear_probe import LinearClassifiers, fit_linear_classifiers, split_train_val, top1_per_config


def paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine similarity of row i of `a` with row i of `b`."""
    return float(F.cosine_similarity(a.float(), b.float(), dim=1).mean())


def class_pair_cosines(
    features: torch.Tensor, labels: torch.Tensor, pairs: int, generator: torch.Generator
) -> dict[str, float]:
    """Mean cosine between random pairs of *different* images of the same class and of different
    classes (`pairs` draws of each kind, fixed by `generator`)."""
    x = F.normalize(features.float(), dim=1)
    n = len(labels)
    first = torch.randint(0, n, (pairs * 8,), generator=generator)
    second = torch.randint(0, n, (pairs * 8,), generator=generator)
    distinct = first != second
    same = distinct & (labels[first] == labels[second])
    other = distinct & (labels[first] != labels[second])
    result = {}
    for name, chosen in (("same_class", same), ("different_class", other)):
        rows_a, rows_b = first[chosen][:pairs], second[chosen][:pairs]
        result[name] = float((x[rows_a] * x[rows_b]).sum(1).mean()) if len(rows_a) else float("nan")
    return result


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction (%) of images whose two predictions agree."""
    return 100.0 * float((a == b).float().mean())


def entropy_bits(labels: torch.Tensor, num_classes: int) -> float:
    """Entropy (bits) of the empirical distribution of integer labels."""
    p = torch.bincount(labels, minlength=num_classes).double() / len(labels)
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def mutual_information_bits(a: torch.Tensor, b: torch.Tensor, num_classes: int) -> float:
    """I(a; b) in bits from the empirical joint distribution of two integer label vectors."""
    joint = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    joint.index_put_((a.long(), b.long()), torch.ones(len(a), dtype=torch.float64), accumulate=True)
    joint /= len(a)
    pa, pb = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    return float((joint[nonzero] * (joint[nonzero] / (pa @ pb)[nonzero]).log2()).sum())


class KNNClassifier:
    """DINO's weighted k-NN (cosine, exp(sim / T) votes) over a fixed bank of clean features."""

    def __init__(self, bank: torch.Tensor, bank_labels: torch.Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07) -> None:
        self.bank, self.bank_labels = bank, bank_labels
        self.num_classes, self.k, self.temperature = num_classes, k, temperature

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        scores = knn_predict_scores(self.bank, self.bank_labels, features, self.num_classes,
                                    self.k, self.temperature)
        return scores.argmax(dim=1)


class LinearProbe:
    """A linear classifier fit once on clean features (the best of a small lr grid on a held-out
    tenth, refit on everything), then applied to any number of degraded test sets."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 lrs: Sequence[float], epochs: int, seed: int = 0) -> None:
        fit_rows, val_rows = split_train_val(len(labels), 0.1, seed)
        sweep = fit_linear_classifiers(features[fit_rows], labels[fit_rows], num_classes,
                                       list(lrs), [0.0] * len(lrs), epochs=epochs, seed=seed)
        best = int(top1_per_config(sweep.logits(features[val_rows]), labels[val_rows]).argmax())
        self.lr = float(lrs[best])
        self.classifier: LinearClassifiers = fit_linear_classifiers(
            features, labels, num_classes, [self.lr], [0.0], epochs=epochs, seed=seed)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier.logits(features)[0].argmax(dim=1)


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 (%)."""
    return 100.0 * float((predictions == labels).float().mean())


def chance_accuracy(labels: torch.Tensor) -> float:
    """Top-1 (%) of always predicting the most frequent class."""
    return 100.0 * float(torch.bincount(labels).max()) / len(labels)


def finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a measure that could not be computed is null."""
    return None if math.isnan(value) else value
