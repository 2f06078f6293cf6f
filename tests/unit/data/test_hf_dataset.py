"""dataset=hf on a tiny Hugging Face set saved in the test (no network): by index and streamed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from shard_samples import png
from test_shard_stream import VIEWS, FakeTrainer, checkpoint, same_batches, take

from ssl.config import CONFIG_DIR
from ssl.data.datamodule import PretrainDataModule
from ssl.data.datasets import DatasetNotFoundError, build_dataset
from ssl.data.masking import RandomTokenMasker

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> str:
    """24 noise PNGs with 3 classes; row 5 is not an image."""
    folder = str(tmp_path_factory.mktemp("hf"))
    images = [{"bytes": b"broken" if i == 5 else png(i), "path": None} for i in range(24)]
    labels = datasets.ClassLabel(names=["a", "b", "c"])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    datasets.Dataset.from_dict({"image": images, "label": [i % 3 for i in range(24)]},
                               features=features).save_to_disk(folder)
    return folder


def config(folder: str, **overrides: object):
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "dataset" / "hf.yaml")
    cfg.merge_with({"name": folder, "label_key": "label", "image_size": 12, "local_crop_size": 8,
                    "patch_size": 4, **overrides})
    return cfg


def data_module(cfg, workers: int = 0) -> PretrainDataModule:
    data = PretrainDataModule(cfg, VIEWS, batch_size=4, num_workers=workers, seed=7,
                              dataset=build_dataset(cfg, "pretrain"),
                              maskers=[RandomTokenMasker(9, 0.5, prefix="m")])
    data.trainer = FakeTrainer()  # type: ignore[assignment]
    return data


def test_by_index_with_labels_and_a_broken_row_counted(saved: str) -> None:
    cfg = config(saved)
    table = build_dataset(cfg, "train")
    assert (len(table), table.classes, table.num_classes) == (24, ["a", "b", "c"], 3)
    assert table.targets[:4] == [0, 1, 2, 0]
    assert table[4][0].size == (12, 12) and table[4][1] == 1
    data = data_module(cfg)
    data.setup()
    batches = take(data, data.train_dataloader())
    assert sum(len(b["index"]) for b in batches) == 24  # the broken row's slot is refilled
    assert [path for b in batches for path, _ in b["unreadable"]] == [f"{saved}[5]"]


def test_streamed_files_resume_bit_identical(saved: str) -> None:
    cfg = config(saved, streaming=True, epoch_samples=32, num_shards=4, shuffle_buffer=5)
    whole = data_module(cfg)
    whole.setup()
    uninterrupted = take(whole, whole.train_dataloader())
    assert len(uninterrupted) == 8 and {i for b in uninterrupted for i in b["index"].tolist()} == {-1}
    killed = data_module(cfg)
    killed.setup()
    head = take(killed, killed.train_dataloader(), 3)
    resumed = data_module(cfg)
    resumed.load_state_dict(checkpoint(killed, 0, 3))
    same_batches(head + take(resumed, resumed.train_dataloader()), uninterrupted)


def test_errors_name_the_fix(saved: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DatasetNotFoundError, match="no column 'img'; its columns are \\['image', 'label'\\]"):
        build_dataset(config(saved, image_key="img"), "train")
    with pytest.raises(DatasetNotFoundError, match="dataset.epoch_samples=N"):
        build_dataset(config(saved, streaming=True), "pretrain")
    with pytest.raises(DatasetNotFoundError, match="no test split"):
        build_dataset(config(saved), "test")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DatasetNotFoundError, match="pip install"):
        build_dataset(config(saved), "train")
