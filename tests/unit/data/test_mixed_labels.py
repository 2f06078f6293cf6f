"""The pretraining set of a mixed run: labels kept for the chosen subset, a folder's unlabelled
pool, the recorded split read back on resume, and batches with a fixed labelled count."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from synthetic import NoiseImages, three_classes

from ssl.data.datamodule import PretrainDataModule
from ssl.data.datasets import build_dataset
from ssl.data.labelled_split import SPLIT_FILE, write_split
from ssl.data.mixed_labels import labelled_pretrain_set
from ssl.data.spec import LABEL, ViewSpec
from ssl.errors import IncompatibleConfigError

DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5] * 3, "std": [0.25] * 3,
    "labelled_fraction": None, "labelled_per_class": 2, "labelled_file": None,
})


class Labelled(NoiseImages):
    """24 noise images of three classes, with `targets` like the built-in datasets."""

    num_classes = 3

    def __init__(self) -> None:
        super().__init__(24, 16, 16, label=three_classes)
        self.targets = [three_classes(i) for i in range(24)]


def test_labels_kept_for_the_subset_only_and_nothing_without_a_subset() -> None:
    data = Labelled()
    same, split = labelled_pretrain_set({**DATASET, "labelled_per_class": None}, data, seed=0)
    assert same is data and split is None
    mixed, split = labelled_pretrain_set(DATASET, data, seed=0)
    labels = [mixed[i][1] for i in range(len(mixed))]
    assert sorted(np.flatnonzero(np.asarray(labels) >= 0)) == sorted(split.indices)
    assert all(labels[i] == three_classes(i) for i in split.indices) and labels.count(-1) == 18
    assert list(mixed.targets) == labels and mixed.num_classes == 3


def test_a_recorded_split_wins_over_a_new_draw(tmp_path: Path) -> None:
    data = Labelled()
    _, first = labelled_pretrain_set(DATASET, data, seed=0)
    write_split(str(tmp_path / SPLIT_FILE), first)
    _, resumed = labelled_pretrain_set(DATASET, data, seed=1, run_dir=tmp_path)  # would draw others
    assert np.array_equal(resumed.indices, first.indices)
    _, fresh = labelled_pretrain_set(DATASET, data, seed=1)
    assert not np.array_equal(fresh.indices, first.indices)


def test_labelled_per_batch_puts_that_many_labels_in_every_batch() -> None:
    mixed, _ = labelled_pretrain_set(DATASET, Labelled(), seed=0)
    data = PretrainDataModule(DATASET, ViewSpec(global_crops=1), batch_size=4, num_workers=0,
                              dataset=mixed, labelled_per_batch=2)
    loader = data.train_dataloader()
    counts = [int((batch[LABEL] >= 0).sum()) for batch in loader]
    assert counts == [2] * 9  # the 18 unlabelled images, 2 per batch
    plain = PretrainDataModule(DATASET, ViewSpec(global_crops=1), batch_size=4, num_workers=0, dataset=mixed)
    assert sum(int((b[LABEL] >= 0).sum()) for b in plain.train_dataloader()) == 6  # natural rate


class Unlabelled(NoiseImages):
    targets = [-1] * 8


@pytest.mark.parametrize("dataset,message", [
    (Unlabelled(8), "no labelled image"), (NoiseImages(8), "exposes no labels"),
])
def test_labelled_per_batch_without_labels_is_refused_before_training(dataset: NoiseImages,
                                                                      message: str) -> None:
    with pytest.raises(IncompatibleConfigError, match=message):
        PretrainDataModule(DATASET, ViewSpec(global_crops=1), batch_size=4, num_workers=0,
                           dataset=dataset, labelled_per_batch=2)


def image_folder(root: Path, layout: dict[str, int]) -> Path:
    for folder, count in layout.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / folder / f"{i}.png")
    return root


def test_imagefolder_adds_an_unlabelled_pool_to_pretraining_only(tmp_path: Path) -> None:
    labelled = image_folder(tmp_path / "labelled", {"cat": 2, "dog": 3})
    pool = image_folder(tmp_path / "pool", {"a": 2, "a/b": 2})  # nested folders are not classes
    cfg = {"name": "imagefolder", "root": str(labelled), "unlabelled_root": str(pool)}
    pretrain, train = build_dataset(cfg, "pretrain"), build_dataset(cfg, "train")
    assert len(pretrain) == 9 and len(train) == 5 and pretrain.num_classes == 2
    assert list(pretrain.targets) == [0, 0, 1, 1, 1, -1, -1, -1, -1] == [pretrain[i][1] for i in range(9)]
    cfg.update(labelled_fraction=None, labelled_per_class=1, labelled_file=None)
    mixed, split = labelled_pretrain_set(cfg, pretrain, seed=0)
    assert json.loads(json.dumps(split.to_dict(pretrain.targets)))["per_class_counts"] == {"0": 1, "1": 1}
    assert int((np.asarray(mixed.targets) >= 0).sum()) == 2
