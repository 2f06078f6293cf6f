"""The semi-supervised protocol of k-NN and the linear probe: a seeded, recorded, reusable labelled
subset of train (ssl/eval/labelled.py), drawn from the images the evaluation reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from synthetic import NoiseImages, three_classes

from ssl.config import CONFIG_DIR
from ssl.data.datamodule import clean_loader
from ssl.eval import knn, linear
from ssl.eval.cli import run_command
from ssl.eval.encoder import labelled_features
from ssl.eval.labelled import pool_indices

CLASSES = 3
COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200))


def image_folder(root: Path, per_class: int, offset: int = 0, size: int = 8) -> Path:
    """root/c<k>/<i>.png: class k is a colour, image i adds its own seeded noise."""
    for c, colour in enumerate(COLOURS[:CLASSES]):
        (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(offset, offset + per_class):
            noise = np.random.default_rng(1000 * c + i).integers(-40, 40, (size, size, 3))
            pixels = np.clip(np.asarray(colour) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20 train and 5 test images per class."""
    root = tmp_path_factory.mktemp("labelled")
    image_folder(root / "train", 20)
    image_folder(root / "test", 5, offset=100)
    return root


def eval_cfg(command: str, root: Path, cache_dir: Path, *overrides: str):
    """conf/eval/<command>.yaml composed for raw pixels of the generated folders."""
    common = [
        "dataset=imagefolder", f"dataset.root={root / 'train'}", f"dataset.test_root={root / 'test'}",
        "dataset.image_size=8", "pixels=true", "num_workers=0", "device=cpu", "output=null",
        f"cache_dir={cache_dir}",
    ]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(f"eval/{command}", overrides=[*common, *overrides])


@pytest.mark.parametrize("max_samples", [None, 7, 10, 23, 50])
def test_pool_indices_follow_the_clean_loader(max_samples: int | None) -> None:
    data = NoiseImages(23, 8, 8, label=three_classes)
    dataset_cfg = OmegaConf.create({"image_size": 8, "mean": [0.5] * 3, "std": [0.5] * 3})
    loader = clean_loader(data, dataset_cfg, batch_size=5, num_workers=0, max_samples=max_samples)
    read = torch.cat([batch["index"] for batch in loader]).numpy()
    np.testing.assert_array_equal(read, pool_indices(len(data), max_samples))


def test_knn_subset_is_seeded_per_class_and_recorded(folders: Path, tmp_path: Path) -> None:
    output = tmp_path / "r.json"
    cfg = eval_cfg("knn", folders, tmp_path / "cache", "labelled_fraction=0.2", f"output={output}")
    result = run_command("knn", cfg, knn.evaluate, knn.summary)
    labelled = result["labelled"]
    assert labelled["labelled_fraction"] == 0.2 and labelled["seed"] == 0
    assert labelled["per_class_counts"] == {0: 4, 1: 4, 2: 4}
    assert labelled["num_labelled"] == result["train_size"] == 12 and labelled["drawn_from"] == 60
    assert result["test_size"] == 15  # the test split stays whole
    written = json.loads(output.read_text())["labelled"]
    assert written["indices"] == labelled["indices"] and written["num_labelled"] == 12

    again = knn.evaluate(cfg)  # from the cache this time
    assert again["labelled"]["indices"] == labelled["indices"]
    assert set(again["cache"].values()) == {"hit"}
    other = knn.evaluate(eval_cfg("knn", folders, tmp_path / "cache", "labelled_fraction=0.2", "seed=1"))
    assert other["labelled"]["indices"] != labelled["indices"]
    assert other["labelled"]["per_class_counts"] == {0: 4, 1: 4, 2: 4}


@pytest.mark.parametrize("full_split_cached", [True, False])
def test_subset_rows_are_those_images_features(
    folders: Path, tmp_path: Path, full_split_cached: bool
) -> None:
    """From the whole split's cache, or (nothing cached) encoding the 9 labelled images alone."""
    cache = tmp_path / "c"
    if full_split_cached:
        labelled_features(eval_cfg("knn", folders, cache), "k-NN")
    sub = labelled_features(eval_cfg("knn", folders, cache, "labelled_per_class=3"), "k-NN")
    train_entries = {p: json.loads(p.read_text()) for p in cache.glob("*.json")}
    train_entries = {p: d for p, d in train_entries.items() if d["split"] == "train"}
    (path, description), = train_entries.items()
    rows = len(torch.load(path.with_suffix(".pt"), weights_only=True)["labels"])
    if full_split_cached:
        assert "labelled_count" not in description and rows == 60
    else:  # only the subset was encoded, and it is cached under its own key
        assert description["labelled_count"] == 9 and rows == 9
    full = labelled_features(eval_cfg("knn", folders, tmp_path / "full"), "k-NN")
    indices = sub.labelled["indices"]
    assert len(indices) == 9 and sub.labelled["per_class_counts"] == {0: 3, 1: 3, 2: 3}
    assert torch.equal(sub.train_x, full.train_x[indices]) and torch.equal(sub.train_y, full.train_y[indices])
    assert torch.equal(sub.test_x, full.test_x)
    again = labelled_features(eval_cfg("knn", folders, cache, "labelled_per_class=3"), "k-NN")
    assert set(again.cached.values()) == {"hit"} and torch.equal(again.train_x, sub.train_x)


def test_linear_probe_sees_the_same_subset_as_knn(folders: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    knn_result = knn.evaluate(eval_cfg("knn", folders, cache, "labelled_per_class=5"))
    probe = eval_cfg("linear", folders, cache, "labelled_per_class=5", "probe.epochs=2",
                     "probe.lrs=[0.1]", "probe.weight_decays=[0.0]")
    result = linear.evaluate(probe)
    assert result["labelled"] == knn_result["labelled"] and result["train_size"] == 15
    assert result["test_size"] == 15


def test_dino_protocol_trains_on_the_subset(folders: Path, tmp_path: Path) -> None:
    cfg = eval_cfg("linear", folders, tmp_path / "c", "labelled_per_class=2", "probe.protocol=dino",
                   "probe.dino.epochs=1", "probe.dino.batch_size=4")
    result = linear.evaluate(cfg)
    assert result["train_size"] == 6 and result["test_size"] == 15
    assert result["labelled"]["per_class_counts"] == {0: 2, 1: 2, 2: 2}


def test_subset_is_drawn_from_the_max_train_samples_pool(folders: Path, tmp_path: Path) -> None:
    cfg = eval_cfg("knn", folders, tmp_path / "c", "labelled_per_class=2", "max_train_samples=30")
    labelled = knn.evaluate(cfg)["labelled"]
    assert set(labelled["indices"]) <= set(pool_indices(60, 30).tolist())
    assert labelled["drawn_from"] == 30 and labelled["per_class_counts"] == {0: 2, 1: 2, 2: 2}


def test_labelled_file_round_trip(folders: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = knn.evaluate(eval_cfg("knn", folders, cache, "labelled_fraction=0.1", "seed=3"))["labelled"]
    split_json = tmp_path / "labelled_split.json"
    split_json.write_text(json.dumps(first))
    from_json = knn.evaluate(eval_cfg("knn", folders, cache, f"labelled_file={split_json}"))
    assert from_json["labelled"]["indices"] == first["indices"]
    assert from_json["labelled"]["labelled_file"] == str(split_json)
    assert from_json["train_size"] == 6
    lines = tmp_path / "split.txt"
    lines.write_text("\n".join(str(i) for i in first["indices"]) + "\n")
    from_text = knn.evaluate(eval_cfg("knn", folders, cache, f"labelled_file={lines}"))
    assert from_text["labelled"]["indices"] == first["indices"]


def test_labelled_file_outside_the_pool_is_refused(folders: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.txt"
    split.write_text("0\n1\n")  # the 30-image pool holds every second image: 1 is not in it
    cfg = eval_cfg("knn", folders, tmp_path / "c", f"labelled_file={split}", "max_train_samples=30")
    with pytest.raises(ValueError, match="outside the 30 evaluated ones"):
        knn.evaluate(cfg)
    split.write_text("0\n60\n")  # 60 is past the 60 train images
    with pytest.raises(ValueError, match="outside 0..59"):
        knn.evaluate(eval_cfg("knn", folders, tmp_path / "c", f"labelled_file={split}"))


def test_two_ways_of_choosing_are_refused(folders: Path, tmp_path: Path) -> None:
    cfg = eval_cfg("knn", folders, tmp_path / "c", "labelled_fraction=0.1", "labelled_per_class=2")
    with pytest.raises(ValueError, match="labelled_fraction, labelled_per_class are all set"):
        knn.evaluate(cfg)


def test_cached_features_without_indices_still_work(folders: Path, tmp_path: Path) -> None:
    """Entries written before rows carried their dataset index: one row per pool image, in order."""
    cache = tmp_path / "cache"
    knn.evaluate(eval_cfg("knn", folders, cache))  # the whole split, which the subset is read from
    reference = knn.evaluate(eval_cfg("knn", folders, cache, "labelled_fraction=0.2"))
    entries = list(cache.glob("*.pt"))
    assert entries
    for path in entries:
        entry = torch.load(path, weights_only=True)
        assert "indices" in entry
        torch.save({k: v for k, v in entry.items() if k != "indices"}, path)
    old = knn.evaluate(eval_cfg("knn", folders, cache, "labelled_fraction=0.2"))
    assert set(old["cache"].values()) == {"hit"}
    assert old["labelled"] == reference["labelled"] and old["k"] == reference["k"]
