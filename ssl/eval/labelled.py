"""The labelled part of the train split an evaluation may use (semi-supervised protocol).

`labelled_fraction=0.01` (or `labelled_per_class=N`, `labelled_file=<path>`) restricts what
k-NN, the linear probe and fine-tuning train on to a fixed, seeded, per-class subset of the train
split (ssl/data/labelled_split.py draws it); the test split stays whole. Every command draws it
the same way from the same pool of images (the whole train split, or its `max_train_samples`
subset), so with the same seed k-NN, linear and fine-tuning at 1 % see the same images.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ssl.data.labelled_split import LabelledSplit, choose_labelled, dataset_labels

LABELLED_KEYS = ("labelled_fraction", "labelled_per_class", "labelled_file")


def pool_indices(size: int, max_samples: int | None) -> np.ndarray:
    """The train images an evaluation reads: all, or `max_samples` evenly spaced ones.

    The same rule as `ssl.data.datamodule.clean_loader` (tests/unit/eval/test_labelled_eval.py
    checks they agree), so a labelled subset drawn from this pool is among the extracted rows.
    """
    if max_samples and max_samples < size:
        step = size / max_samples
        return np.asarray([int(i * step) for i in range(int(max_samples))], dtype=np.int64)
    return np.arange(size, dtype=np.int64)


def wants_labelled_subset(cfg: Mapping[str, Any]) -> bool:
    """Whether any of labelled_fraction / labelled_per_class / labelled_file is set."""
    return any(cfg.get(key) is not None for key in LABELLED_KEYS)


def choose_eval_split(
    cfg: Mapping[str, Any], labels: np.ndarray, max_samples: int | None = None
) -> LabelledSplit | None:
    """The labelled subset (dataset indices) asked for by `cfg`, drawn from the evaluated pool.

    A fraction or a per-class count is drawn per class among the pool's images with `cfg.seed`;
    a file's indices are dataset indices and must lie in the pool. None when nothing is set.
    """
    fraction, per_class, file = (cfg.get(key) for key in LABELLED_KEYS)
    seed = int(cfg["seed"])
    pool = pool_indices(len(labels), max_samples)
    if file is not None:
        split = choose_labelled(
            labels, fraction=fraction, per_class=per_class, file=file, seed=seed, prefix=""
        )
        outside = np.setdiff1d(split.indices, pool)  # type: ignore[union-attr]
        if len(outside):
            raise ValueError(
                f"labelled_file={file} lists {len(outside)} images outside the {len(pool)} evaluated ones "
                f"(max_train_samples={max_samples}): set max_train_samples=null"
            )
        return split
    chosen = choose_labelled(labels[pool], fraction=fraction, per_class=per_class, seed=seed, prefix="")
    if chosen is None:
        return None
    return LabelledSplit(pool[chosen.indices], chosen.how)


def split_record(split: LabelledSplit | None, labels: np.ndarray, pool_size: int) -> dict[str, Any] | None:
    """What goes into a result's "labelled": how it was chosen, counts per class, the indices."""
    if split is None:
        return None
    return {**split.to_dict(labels), "drawn_from": int(pool_size)}


def labelled_train_split(
    cfg: Mapping[str, Any], train_data: Any
) -> tuple[LabelledSplit | None, dict[str, Any] | None]:
    """(split, record) for a train dataset, or (None, None) when no labelled subset is asked for.

    Labels are read without decoding images (`targets`); a dataset without them is an error only
    when a subset is asked for.
    """
    if not wants_labelled_subset(cfg):
        return None, None
    labels = dataset_labels(train_data)
    max_samples = cfg.get("max_train_samples")
    split = choose_eval_split(cfg, labels, max_samples)
    return split, split_record(split, labels, len(pool_indices(len(labels), max_samples)))


def rows_in_split(row_indices: torch.Tensor, split: LabelledSplit) -> torch.Tensor:
    """Boolean mask over extracted rows (their dataset indices): True for labelled images."""
    keep = np.isin(row_indices.cpu().numpy(), split.indices)
    return torch.from_numpy(keep).to(row_indices.device)
