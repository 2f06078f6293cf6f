"""Which training images keep their label: a seeded, per-class split, recorded so it can be reused.

Label-efficient training and evaluation ("1% of the labels") need the same few labelled images
every time and in every command: `choose_labelled` draws them per class from a seeded generator
(so each class keeps its share), or reads them from a file; `write_split` records the choice in
the run directory or the result, and that file can be handed back (`labelled_file=`) to reuse it.
Images whose label is negative (unlabelled) are never chosen.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLIT_FILE = "labelled_split.json"


@dataclass(frozen=True)
class LabelledSplit:
    """The chosen indices (sorted) and how they were chosen (fraction / per_class / file, seed)."""

    indices: np.ndarray
    how: dict[str, Any]

    def __len__(self) -> int:
        return len(self.indices)

    def mask(self, size: int) -> np.ndarray:
        """A boolean mask over `size` samples, True where the sample is labelled."""
        mask = np.zeros(size, dtype=bool)
        mask[self.indices] = True
        return mask

    def to_dict(self, labels: Sequence[int] | np.ndarray | None = None) -> dict[str, Any]:
        """JSON-ready: how, the count, per-class counts (given the labels) and the indices."""
        out: dict[str, Any] = {**self.how, "num_labelled": int(len(self.indices))}
        if labels is not None:
            chosen = np.asarray(labels)[self.indices]
            classes, counts = np.unique(chosen, return_counts=True)
            out["per_class_counts"] = {int(c): int(n) for c, n in zip(classes, counts)}
        out["indices"] = [int(i) for i in self.indices]
        return out


def stratified_indices(labels: Sequence[int] | np.ndarray, count_of: Any, seed: int) -> np.ndarray:
    """Per class c (labels >= 0), the first `count_of(n_c)` of a seeded permutation of its samples."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    chosen = []
    for c in np.unique(labels[labels >= 0]):
        members = np.flatnonzero(labels == c)
        take = min(len(members), int(count_of(len(members))))
        chosen.append(rng.permutation(members)[:take])
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)


def choose_labelled(
    labels: Sequence[int] | np.ndarray,
    *,
    fraction: float | None = None,
    per_class: int | None = None,
    file: str | None = None,
    seed: int = 0,
    prefix: str = "dataset.",
) -> LabelledSplit | None:
    """The labelled subset asked for by one of fraction / per_class / file; None when none is set.

    fraction f: round(f x n_c) images of each class c (at least one); per_class N: min(N, n_c);
    file: a `labelled_split.json` written before, or a text file of one index per line.
    `prefix` names the settings in error messages (`dataset.`, `eval.`).
    """
    given = {name: v for name, v in (("labelled_fraction", fraction), ("labelled_per_class", per_class),
                                     ("labelled_file", file)) if v is not None}
    if not given:
        return None
    if len(given) > 1:
        names = ", ".join(f"{prefix}{k}" for k in given)
        raise ValueError(
            f"{names} are all set: choose the labelled subset by one of them, set the others to null"
        )
    labels = np.asarray(labels, dtype=np.int64)
    if fraction is not None:
        f = float(fraction)
        if not 0.0 < f <= 1.0:
            raise ValueError(f"{prefix}labelled_fraction={fraction}: a fraction in (0, 1], e.g. 0.01 for 1%")
        indices = stratified_indices(labels, lambda n: max(1, math.floor(f * n + 0.5)), seed)
        how: dict[str, Any] = {"labelled_fraction": f, "seed": int(seed)}
    elif per_class is not None:
        n = int(per_class)
        if n < 1:
            raise ValueError(f"{prefix}labelled_per_class={per_class}: at least 1 image per class")
        indices = stratified_indices(labels, lambda _: n, seed)
        how = {"labelled_per_class": n, "seed": int(seed)}
    else:
        indices = read_split_file(str(file), len(labels), prefix)
        how = {"labelled_file": os.path.abspath(str(file))}
    if len(indices) and (labels[indices] < 0).any():
        bad = int(indices[labels[indices] < 0][0])
        raise ValueError(f"{prefix}labelled_file lists index {bad}, an image without a label")
    if not len(indices):
        raise ValueError(f"the dataset has no labelled images to choose from ({prefix}{next(iter(given))})")
    return LabelledSplit(indices, how)


def split_indices(record: dict) -> list[int]:
    """The "indices" of a split record, or of the "labelled" record inside an evaluation result."""
    if "indices" not in record and isinstance(record.get("labelled"), dict):
        record = record["labelled"]
    return record["indices"]


def read_split_file(path: str, size: int, prefix: str = "dataset.") -> np.ndarray:
    """Indices from a `labelled_split.json` (its "indices"), an ssl.eval result JSON (its
    "labelled" record), or a text file of one index per line; checked against `size`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{prefix}labelled_file={path} does not exist")
    with open(path) as f:
        text = f.read()
    try:
        values = split_indices(json.loads(text)) if path.endswith(".json") else [
            int(line) for line in text.split() if line.strip()
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            f"{prefix}labelled_file={path}: expected a labelled_split.json (with \"indices\") or one "
            f"integer index per line ({error})"
        ) from error
    indices = np.unique(np.asarray(values, dtype=np.int64))
    if len(indices) and (indices[0] < 0 or indices[-1] >= size):
        raise ValueError(f"{prefix}labelled_file={path} lists indices outside 0..{size - 1}")
    return indices


def write_split(path: str, split: LabelledSplit, labels: Sequence[int] | np.ndarray | None = None) -> str:
    """Record the split as JSON (readable back with `labelled_file=`); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(split.to_dict(labels), f)
    return path


def dataset_labels(dataset: Any) -> np.ndarray:
    """Every sample's label without decoding an image (`targets` of the built-in datasets)."""
    if hasattr(dataset, "targets"):
        return np.asarray(dataset.targets, dtype=np.int64)
    inner = getattr(dataset, "dataset", None)
    if inner is None:
        raise ValueError("this dataset exposes no labels (`targets`): a labelled subset needs labelled data")
    labels = dataset_labels(inner)
    subset = getattr(dataset, "indices", None)  # torch.utils.data.Subset
    return labels[np.asarray(subset, dtype=np.int64)] if subset is not None else labels
