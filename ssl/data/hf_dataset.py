"""`dataset=hf`: a Hugging Face `datasets` set, from the local cache, a local path, or streamed.

`dataset.name` is the set's own name (Hub id or local path; `dataset.builder: hf` picks this
builder), `dataset.split` / `dataset.test_split` its splits, `dataset.image_key` / `label_key`
its columns. The image column is read undecoded and decoded here, so a broken image is skipped
and counted as in a folder.

- `streaming: false` (default): the Arrow table is read by index, so the shuffle, the DDP split
  and the exact resume are the map-style ones (`ResumableSampler`), bit-identical on resume.
- `streaming: true`: each of the set's data files is one shard of the shard stream
  (`ssl.data.shard_stream`): split over ranks and workers, shuffle buffer, reader positions in
  the checkpoint. Per-file row counts are unknown before reading, so the stream draws files
  with replacement and needs `dataset.epoch_samples`; samples carry index -1.

`datasets` is optional (`pip install -e ".[streaming]"`); without it this fails with that hint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ssl.data.datasets import DatasetNotFoundError, UnreadableImageError, _cfg_get, to_rgb
from ssl.data.shards import decode_image

INSTALL_HINT = 'dataset=hf needs Hugging Face datasets: pip install -e ".[streaming]" or pip install datasets'


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise DatasetNotFoundError(INSTALL_HINT) from error
    return datasets


def decode_cell(value: Any, where: str) -> Image.Image:
    """An image cell as RGB: undecoded {"bytes", "path"}, raw bytes, a PIL image or an array."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return decode_image(value["bytes"], where)
        path = value.get("path")
        if path and os.path.isfile(path):
            with open(path, "rb") as f:
                return decode_image(f.read(), where)
        raise UnreadableImageError(where, "image cell holds neither bytes nor a readable path")
    if isinstance(value, (bytes, bytearray)):
        return decode_image(bytes(value), where)
    if isinstance(value, Image.Image):
        return to_rgb(value)
    try:
        import numpy as np

        return to_rgb(Image.fromarray(np.asarray(value)))
    except Exception as error:  # noqa: BLE001 - any cell type Pillow cannot take
        raise UnreadableImageError(where, f"image cell of type {type(value).__name__}: {error}") from error


def _columns(table: Any, image_key: str, label_key: str | None, name: str) -> tuple[Any, list[str]]:
    """The table with its image column undecoded, and the label's class names ([] if none)."""
    datasets = _datasets()
    features = table.features or {}
    if image_key not in features:
        raise DatasetNotFoundError(
            f"dataset=hf {name}: no column {image_key!r}; its columns are {sorted(features)} "
            "(set dataset.image_key)."
        )
    if isinstance(features[image_key], datasets.Image):
        table = table.cast_column(image_key, datasets.Image(decode=False))
    classes: list[str] = []
    if label_key is not None:
        if label_key not in features:
            raise DatasetNotFoundError(
                f"dataset=hf {name}: no label column {label_key!r}; its columns are {sorted(features)} "
                "(set dataset.label_key, or null for unlabelled images)."
            )
        classes = list(getattr(features[label_key], "names", None) or [])
    return table, classes


class _HFColumns:
    """The image and label columns of a Hugging Face table, checked, with its class names."""

    def __init__(self, table: Any, image_key: str, label_key: str | None, name: str,
                 num_classes: int | None = None) -> None:
        self.table, self.classes = _columns(table, image_key, label_key, name)
        self.image_key, self.label_key, self.name = image_key, label_key, name
        self.has_labels = label_key is not None
        self.num_classes = (len(self.classes) or num_classes) if self.has_labels else None


class HFImages(_HFColumns, Dataset):
    """A map-style Hugging Face table as `(RGB PIL image, label)`; undecodable rows are unreadable."""

    @property
    def targets(self) -> list[int]:
        if not self.has_labels:
            return [-1] * len(self)
        return [int(x) for x in self.table[self.label_key]]

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        row = self.table[int(index)]
        image = decode_cell(row[self.image_key], f"{self.name}[{index}]")
        return image, int(row[self.label_key]) if self.has_labels else -1


class HFShards(_HFColumns):
    """A streamed Hugging Face set as a shard source: each data file is one shard."""

    sizes = None  # rows per file are unknown until read: a resampled stream only

    def __init__(self, table: Any, image_key: str, label_key: str | None, name: str,
                 num_classes: int | None = None) -> None:
        super().__init__(table, image_key, label_key, name, num_classes)
        self.urls = [f"{name}#file{i}" for i in range(self.num_shards)]
        self._preview: list[dict[str, Any]] | None = None

    @property
    def num_shards(self) -> int:
        return int(self.table.num_shards)

    def samples(self, shard: int, skip: int = 0) -> Iterator[tuple[int, str, dict[str, Any]]]:
        part = self.table.shard(num_shards=self.num_shards, index=shard, contiguous=True)
        for ordinal, row in enumerate(part):
            if ordinal >= skip:
                yield ordinal, str(ordinal), row

    def decode(self, sample: dict[str, Any], where: str) -> tuple[Image.Image, int]:
        image = decode_cell(sample[self.image_key], where)
        return image, int(sample[self.label_key]) if self.has_labels else -1

    def index(self, shard: int, ordinal: int) -> int:
        return -1

    def __len__(self) -> int:
        raise TypeError("a streamed Hugging Face set has no known length (see dataset.epoch_samples)")

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """The first rows of the first file, for the few pictures callbacks draw."""
        if self._preview is None:
            self._preview = [row for _, _, row in self._take(64)]
            if not self._preview:
                raise DatasetNotFoundError(f"dataset=hf {self.name}: its first file holds no row")
        row = self._preview[index % len(self._preview)]
        return self.decode(row, f"{self.name}[{index}]")

    def _take(self, count: int) -> list[tuple[int, str, dict[str, Any]]]:
        out = []
        for item in self.samples(0):
            out.append(item)
            if len(out) >= count:
                break
        return out


def _load(cfg: Any, split: str, streaming: bool) -> Any:
    datasets = _datasets()
    name = str(_cfg_get(cfg, "name"))
    path = os.path.expanduser(name)
    try:
        if os.path.isdir(path) and any(
            os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json")
        ):
            table = datasets.load_from_disk(path)  # a save_to_disk() folder
            if isinstance(table, datasets.DatasetDict):
                table = table[split]
            if streaming:
                return table.to_iterable_dataset(num_shards=int(_cfg_get(cfg, "num_shards")))
            return table
        return datasets.load_dataset(
            name, _cfg_get(cfg, "config"), split=split, streaming=streaming,
            cache_dir=_cfg_get(cfg, "cache_dir"),
        )
    except (FileNotFoundError, ValueError, KeyError, ConnectionError, OSError) as error:
        raise DatasetNotFoundError(
            f"dataset=hf: cannot load {name!r} split {split!r} ({type(error).__name__}: {error}). Check "
            "dataset.name (a Hub id or a local path), dataset.config and dataset.split; offline, the set "
            "must be in the local cache (dataset.cache_dir) or saved with save_to_disk."
        ) from error


def build_hf(cfg: Any, split: str) -> Dataset:
    """pretrain/train: `dataset.split`; test: `dataset.test_split`. Streamed only for pretraining."""
    name = _cfg_get(cfg, "name")
    if not name or name == "hf":
        raise DatasetNotFoundError("dataset=hf: set dataset.name to a Hugging Face dataset (Hub id or path).")
    which = _cfg_get(cfg, "test_split") if split == "test" else _cfg_get(cfg, "split")
    if which is None:
        raise DatasetNotFoundError(f"dataset=hf {name}: no {split} split (dataset.test_split is null).")
    streaming = bool(_cfg_get(cfg, "streaming")) and split == "pretrain"
    table = _load(cfg, str(which), streaming)
    args = (str(_cfg_get(cfg, "image_key")), _cfg_get(cfg, "label_key"), str(name),
            _cfg_get(cfg, "num_classes"))
    if streaming:
        if _cfg_get(cfg, "epoch_samples") is None:
            raise DatasetNotFoundError(
                f"dataset=hf {name} with dataset.streaming=true: set dataset.epoch_samples=N (the stream "
                "draws the set's files with replacement; their row counts are unknown before reading)."
            )
        return HFShards(table, *args)  # type: ignore[return-value]
    return HFImages(table, *args)

