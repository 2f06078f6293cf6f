"""The pretraining set of a mixed run: which images keep their label, the others read as -1.

`dataset.labelled_fraction / labelled_per_class / labelled_file` keep the labels of a seeded
per-class subset (ssl/data/labelled_split.py) and hide the rest behind -1, so a supervised loss
beside a self-supervised one sees only that subset while every image feeds the latter. The
choice is recorded in the run directory and read back from there when the run resumes, so it
never changes under a run. A folder dataset can add an unlabelled pool (`WithUnlabelled`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ssl.data.labelled_split import SPLIT_FILE, LabelledSplit, choose_labelled, dataset_labels

LABELLED_KEYS = ("labelled_fraction", "labelled_per_class", "labelled_file")


class WithUnlabelled(Dataset):
    """A labelled dataset, then a pool of unlabelled images (label -1): indices [0, n) keep the
    labelled dataset's own, so a split of the pretraining set is a split of its train set too."""

    def __init__(self, labelled: Dataset, unlabelled: Dataset) -> None:
        self.labelled, self.unlabelled = labelled, unlabelled
        self.size = len(labelled)  # type: ignore[arg-type]
        self.has_labels = bool(getattr(labelled, "has_labels", False))
        self.num_classes = getattr(labelled, "num_classes", None)
        self.classes = list(getattr(labelled, "classes", []))

    @property
    def targets(self) -> list[int]:
        return list(dataset_labels(self.labelled)) + [-1] * len(self.unlabelled)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.size + len(self.unlabelled)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < self.size:
            return self.labelled[index]
        image, _ = self.unlabelled[index - self.size]
        return image, -1


class KeepLabels(Dataset):
    """`dataset` with the labels of `split` only; every other sample reads label -1."""

    def __init__(self, dataset: Dataset, split: LabelledSplit) -> None:
        self.dataset, self.split = dataset, split
        self.keep = split.mask(len(dataset))  # type: ignore[arg-type]
        self.has_labels = True
        self.num_classes = getattr(dataset, "num_classes", None)
        self.classes = list(getattr(dataset, "classes", []))

    @property
    def targets(self) -> np.ndarray:
        return np.where(self.keep, dataset_labels(self.dataset), -1)

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, int(label) if self.keep[index] else -1


def wants_labelled_subset(dataset_cfg: Mapping[str, Any]) -> bool:
    """Whether dataset.labelled_fraction / labelled_per_class / labelled_file is set."""
    return any(dataset_cfg.get(key) is not None for key in LABELLED_KEYS)


def labelled_pretrain_set(
    dataset_cfg: Mapping[str, Any], dataset: Dataset, seed: int, run_dir: str | os.PathLike | None = None
) -> tuple[Dataset, LabelledSplit | None]:
    """(the pretraining set with labels kept for the chosen subset only, the subset), or
    (dataset, None) when none is asked for. A split recorded in `run_dir` (a resumed run) wins."""
    if not wants_labelled_subset(dataset_cfg):
        return dataset, None
    labels = dataset_labels(dataset)
    recorded = os.path.join(run_dir, SPLIT_FILE) if run_dir is not None else None
    if recorded is not None and os.path.isfile(recorded):
        split = choose_labelled(labels, file=recorded, prefix=f"{recorded}: ")
    else:
        split = choose_labelled(labels, **subset_settings(dataset_cfg), seed=seed)
    assert split is not None  # a subset was asked for
    return KeepLabels(dataset, split), split


def subset_settings(dataset_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """choose_labelled's fraction / per_class / file from the dataset config."""
    fraction, per_class, file = (dataset_cfg.get(key) for key in LABELLED_KEYS)
    return {"fraction": fraction, "per_class": per_class, "file": file, "prefix": "dataset."}
