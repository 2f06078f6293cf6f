"""One reference encoder, one degradation, a grid of strengths: every measure per strength.

The reference is fixed (raw pixels, an untrained backbone, a checkpoint); its classifiers are fit
once on clean training features; then, per strength, the clean test images are degraded twice
with independent draws and each measure of ssl/analyze/measures.py is taken. Images travel as
uint8 in [0, 255] and are degraded and encoded a chunk at a time, so memory stays bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ssl.analyze.degradations import Degradation
from ssl.analyze.measures import (
    KNNClassifier,
    LinearProbe,
    accuracy,
    agreement,
    chance_accuracy,
    class_pair_cosines,
    entropy_bits,
    finite_or_none,
    mutual_information_bits,
    paired_cosine,
)

Encode = Callable[[torch.Tensor], torch.Tensor]  # normalised images [B, 3, H, W] -> features [B, D]


@dataclass(frozen=True)
class SweepSettings:
    """How each measure is taken: k-NN (k, temperature), the linear probe (off, or its lr grid and
    epochs), class-pair draws, the chunk size, and the seed every degradation draw derives from."""

    k: int = 20
    temperature: float = 0.07
    linear: bool = True
    linear_lrs: tuple[float, ...] = (1e-3, 1e-2, 0.1, 1.0)
    linear_epochs: int = 20
    pairs: int = 2000
    chunk_size: int = 512
    seed: int = 0


@dataclass
class Reference:
    """A fixed encoder and its clean training features (the k-NN bank and the probe's data)."""

    name: str
    encode: Encode
    train_features: torch.Tensor
    train_labels: torch.Tensor


def normaliser(mean: Sequence[float], std: Sequence[float]) -> Callable[[torch.Tensor], torch.Tensor]:
    """[0, 1] images -> the dataset's normalisation, as the eval transform applies it."""
    m = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return lambda x: (x - m.to(x.device)) / s.to(x.device)


@torch.no_grad()
def encode_degraded(
    encode: Encode, images: torch.Tensor, normalise: Callable[[torch.Tensor], torch.Tensor],
    degrade: Callable[[torch.Tensor, int], torch.Tensor] | None, seed: int, chunk_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Features of uint8 `images`, each chunk degraded by `degrade(images01, chunk_seed)` first
    (None: clean). Chunk seeds derive from `seed`, so a draw is reproducible."""
    out = []
    for i, start in enumerate(range(0, len(images), chunk_size)):
        chunk = images[start : start + chunk_size].to(device).float().div_(255.0)
        if degrade is not None:
            chunk = degrade(chunk, seed * 1_000_003 + i)
        out.append(encode(normalise(chunk)).float())
    return torch.cat(out)


def label_measures(prefix: str, predictions: torch.Tensor, clean: torch.Tensor, labels: torch.Tensor,
                   num_classes: int) -> dict[str, float]:
    """Accuracy, agreement with the clean prediction, and I(clean prediction; degraded prediction)."""
    return {
        f"{prefix}_top1": accuracy(predictions, labels),
        f"{prefix}_agreement": agreement(predictions, clean),
        f"{prefix}_mi_bits": mutual_information_bits(clean, predictions, num_classes),
    }


def sweep_reference(
    reference: Reference,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    normalise: Callable[[torch.Tensor], torch.Tensor],
    degradation: Degradation,
    strengths: Sequence[float],
    settings: SweepSettings,
    device: torch.device | str = "cpu",
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict[str, Any]:
    """The clean measures and one row of measures per strength for `reference`."""
    num_classes = int(max(reference.train_labels.max(), test_labels.max())) + 1
    train_x, train_y = reference.train_features.to(device), reference.train_labels.to(device)
    labels = test_labels.to(device)
    knn = KNNClassifier(train_x, train_y, num_classes, settings.k, settings.temperature)
    probe = (LinearProbe(train_x, train_y, num_classes, settings.linear_lrs, settings.linear_epochs,
                         settings.seed) if settings.linear else None)
    chunk = settings.chunk_size
    clean_x = encode_degraded(reference.encode, test_images, normalise, None, 0, chunk, device)
    clean_knn = knn.predict(clean_x)
    clean_linear = probe.predict(clean_x) if probe else None
    pair_generator = torch.Generator().manual_seed(settings.seed)
    clean_pairs = class_pair_cosines(clean_x, labels.cpu(), settings.pairs, pair_generator)
    clean: dict[str, Any] = {
        "knn_top1": accuracy(clean_knn, labels),
        "knn_prediction_entropy_bits": entropy_bits(clean_knn, num_classes),
        "cos_same_class": clean_pairs["same_class"],
        "cos_different_class": clean_pairs["different_class"],
        "chance_top1": chance_accuracy(labels),
        "label_entropy_bits": entropy_bits(labels, num_classes),
    }
    if probe:
        clean.update(linear_top1=accuracy(clean_linear, labels), linear_lr=probe.lr)
    rows = []
    for index, strength in enumerate(progress(strengths)):
        def degrade(x: torch.Tensor, seed: int, s: float = strength) -> torch.Tensor:
            return degradation.apply(x, s, seed)

        base = settings.seed * 7919 + index * 2
        first = encode_degraded(reference.encode, test_images, normalise, degrade, base, chunk, device)
        second = encode_degraded(reference.encode, test_images, normalise, degrade, base + 1, chunk, device)
        predictions = knn.predict(first)
        row: dict[str, Any] = {"strength": float(strength)}
        row.update(label_measures("knn", predictions, clean_knn, labels, num_classes))
        if probe:
            row.update(label_measures("linear", probe.predict(first), clean_linear, labels, num_classes))
        pairs = class_pair_cosines(first, labels.cpu(), settings.pairs,
                                   torch.Generator().manual_seed(settings.seed))
        row.update(
            cos_clean_degraded=paired_cosine(clean_x, first),
            cos_two_degradations=paired_cosine(first, second),
            cos_same_class_degraded=finite_or_none(pairs["same_class"]),
            cos_different_class_degraded=finite_or_none(pairs["different_class"]),
        )
        rows.append(row)
    return {"reference": reference.name, "bank_size": len(train_y), "clean": clean, "rows": rows}
