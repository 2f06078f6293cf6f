"""The labelled subset: seeded and per class, reproducible, recorded and read back, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl.data.labelled_split import SPLIT_FILE, choose_labelled, dataset_labels, write_split

# 3 classes of 40, 20 and 7 images, interleaved, plus 5 unlabelled images.
LABELS = np.array([0] * 40 + [1] * 20 + [2] * 7 + [-1] * 5)[np.random.default_rng(0).permutation(72)]


def test_nothing_asked_gives_none() -> None:
    assert choose_labelled(LABELS) is None


def test_same_seed_same_split_other_seed_another() -> None:
    a = choose_labelled(LABELS, per_class=3, seed=1)
    assert np.array_equal(a.indices, choose_labelled(LABELS, per_class=3, seed=1).indices)
    assert not np.array_equal(a.indices, choose_labelled(LABELS, per_class=3, seed=2).indices)


def test_per_class_counts_and_never_an_unlabelled_image() -> None:
    split = choose_labelled(LABELS, per_class=10, seed=0)
    counts = split.to_dict(LABELS)["per_class_counts"]
    assert counts == {0: 10, 1: 10, 2: 7}  # class 2 holds only 7
    assert (LABELS[split.indices] >= 0).all() and np.all(np.diff(split.indices) > 0)


def test_fraction_rounds_per_class_with_at_least_one() -> None:
    split = choose_labelled(LABELS, fraction=0.05, seed=0)
    assert split.to_dict(LABELS)["per_class_counts"] == {0: 2, 1: 1, 2: 1}
    assert split.how == {"labelled_fraction": 0.05, "seed": 0}
    assert len(split.mask(len(LABELS))) == 72 and split.mask(len(LABELS)).sum() == 4


def test_written_split_reads_back_as_a_file(tmp_path: Path) -> None:
    split = choose_labelled(LABELS, per_class=4, seed=3)
    path = write_split(str(tmp_path / "run" / SPLIT_FILE), split, LABELS)
    record = json.loads(Path(path).read_text())
    assert record["labelled_per_class"] == 4 and record["num_labelled"] == 12
    again = choose_labelled(LABELS, file=path)
    assert np.array_equal(again.indices, split.indices)
    text = tmp_path / "few.txt"
    text.write_text("\n".join(str(i) for i in split.indices[::-1]) + "\n")
    assert np.array_equal(choose_labelled(LABELS, file=str(text)).indices, split.indices)
    result = tmp_path / "last.knn.json"  # an ssl.eval result records its subset under "labelled"
    result.write_text(json.dumps({"top1": 50.0, "labelled": record}))
    assert np.array_equal(choose_labelled(LABELS, file=str(result)).indices, split.indices)


def test_labels_of_a_subset_are_its_own() -> None:
    class Data(torch.utils.data.Dataset):
        targets = [5, 6, 7, 8]

    assert dataset_labels(torch.utils.data.Subset(Data(), [3, 1])).tolist() == [8, 6]
    with pytest.raises(ValueError, match="exposes no labels"):
        dataset_labels(torch.utils.data.TensorDataset(torch.zeros(2)))


@pytest.mark.parametrize("kwargs,message", [
    ({"fraction": 0.0}, "a fraction in"),
    ({"fraction": 1.5}, "a fraction in"),
    ({"per_class": 0}, "at least 1 image"),
    ({"fraction": 0.1, "per_class": 2}, "are all set"),
    ({"file": "/nonexistent/split.json"}, "does not exist"),
])
def test_bad_settings_say_what_to_change(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        choose_labelled(LABELS, **kwargs)


def test_bad_files_and_unlabelled_data_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("3\n999\n")
    with pytest.raises(ValueError, match="outside 0..71"):
        choose_labelled(LABELS, file=str(outside))
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"something": [1]}')
    with pytest.raises(ValueError, match="expected a labelled_split.json"):
        choose_labelled(LABELS, file=str(garbage))
    unlabelled = tmp_path / "unlabelled.txt"
    unlabelled.write_text(str(int(np.flatnonzero(LABELS < 0)[0])))
    with pytest.raises(ValueError, match="an image without a label"):
        choose_labelled(LABELS, file=str(unlabelled))
    with pytest.raises(ValueError, match="no labelled images"):
        choose_labelled(np.full(10, -1), per_class=1)
