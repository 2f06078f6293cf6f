"""`dataset=webdataset`: images in tar shards, as a source the stream reads and a small map view.

`ShardedImages` knows the shard list (`dataset.urls`), how many samples each shard holds (from
`dataset.index`, a JSON file written by `scripts/pack_shards.py`, or by scanning local shards'
headers), and how to turn one sample's bytes into `(RGB PIL image, label)`. The data module reads
it as a stream (`ssl.data.shard_stream`); `dataset[i]` exists for what wants a few images by
index (pictures of reconstructions, the online k-NN on local shards): local shards are indexed
by byte offset, remote ones serve their first shard's samples.
"""

from __future__ import annotations

import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from ssl.data.datasets import (
    DatasetNotFoundError,
    UnreadableImageError,
    _cfg_get,
    _unreadable_reason,
    to_rgb,
)
from ssl.data.shard_urls import check_local_shards, expand_urls, local_path, open_shard, shard_name
from ssl.data.tar_shards import IndexedSample, Sample, iter_samples, read_indexed, scan_shard

PREVIEW_SAMPLES = 256  # what a remote source keeps in memory to serve `dataset[i]`


def decode_image(data: bytes, where: str) -> Image.Image:
    """Bytes of an encoded image as RGB, decoded in full here; failures as UnreadableImageError."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return to_rgb(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        reason = "empty member (0 bytes)" if not data else _unreadable_reason(where, error)
        raise UnreadableImageError(where, reason) from error


def read_index(path: str, urls: Sequence[str]) -> list[int]:
    """Samples per shard from an index JSON (`{"shards": [{"name", "samples"}]}`), matched by file name."""
    try:
        with open(os.path.expanduser(path)) as f:
            entries = json.load(f)["shards"]
        counts = {os.path.basename(e["name"]): int(e["samples"]) for e in entries}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DatasetNotFoundError(
            f"dataset.index={path} cannot be read as a shard index ({error}); it is the index.json that "
            "scripts/pack_shards.py writes beside the shards, or null to count local shards."
        ) from error
    missing = [u for u in urls if shard_name(u) not in counts]
    if missing:
        raise DatasetNotFoundError(
            f"dataset.index={path} lists no sample count for {len(missing)} shard(s) of dataset.urls, "
            f"e.g. {missing[0]}; point it at the index of these shards (or null to count local shards)."
        )
    return [counts[shard_name(u)] for u in urls]


class ShardedImages:
    """The samples of a shard list: counts, offsets, decoding, and a few by index.

    `sizes` None: unknown (remote shards without an index); only a resampled stream
    (`dataset.epoch_samples`) can read them, and samples carry index -1.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Sequence[int] | None,
        image_keys: Sequence[str],
        label_key: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        self.urls = list(urls)
        self.sizes = None if sizes is None else [int(s) for s in sizes]
        self.image_keys = [k.lower() for k in image_keys]
        self.label_key = label_key.lower() if label_key else None
        self.has_labels = self.label_key is not None and num_classes is not None
        self.num_classes = int(num_classes) if self.has_labels else None
        self.classes: list[str] = []
        self.offsets: list[int] | None = None
        if self.sizes is not None:
            self.offsets = [0]
            for size in self.sizes[:-1]:
                self.offsets.append(self.offsets[-1] + size)
        self._scanned: dict[int, list[IndexedSample]] = {}
        self._preview: list[tuple[str, Sample]] | None = None

    @property
    def num_shards(self) -> int:
        return len(self.urls)

    def __len__(self) -> int:
        if self.sizes is None:
            raise TypeError("the shards' sample counts are unknown: set dataset.index (pack_shards.py)")
        return sum(self.sizes)

    def samples(self, shard: int, skip: int = 0) -> Iterator[tuple[int, str, Sample]]:
        """`(ordinal, key, sample)` of one shard from sample `skip` on (ShardReadError if it breaks)."""
        url = self.urls[shard]
        with open_shard(url) as stream:
            yield from iter_samples(stream, url, skip)

    def index(self, shard: int, ordinal: int) -> int:
        """The sample's row in the whole list (shard offsets in `dataset.urls` order); -1 unknown."""
        return -1 if self.offsets is None else self.offsets[shard] + ordinal

    def identity(self, shard: int, ordinal: int) -> int:
        """A stable integer naming the sample, also without counts (for seeds)."""
        if self.offsets is not None:
            return self.offsets[shard] + ordinal
        return (zlib.crc32(self.urls[shard].encode()) << 32) | ordinal

    def decode(self, sample: Sample, where: str) -> tuple[Image.Image, int]:
        """(RGB image, label) of a sample; a sample without an image or a broken one is unreadable."""
        ext = next((k for k in self.image_keys if k in sample), None)
        if ext is None:
            raise UnreadableImageError(
                where, f"no image member (looked for .{', .'.join(self.image_keys)}; has {sorted(sample)})"
            )
        image = decode_image(sample[ext], f"{where}.{ext}")
        label = -1
        if self.label_key is not None and self.label_key in sample:
            try:
                label = int(sample[self.label_key].decode().strip())
            except ValueError as error:
                where = f"{where}.{self.label_key}"
                raise UnreadableImageError(where, f"label is not an integer: {error}") from error
        return image, label if self.has_labels else -1

    # ------------------------------------------------------------------ by index (a few images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Image `index` of the list: local shards by offset, remote ones from the first shard."""
        if self.offsets is not None and local_path(self.urls[0]) is not None:
            shard = max(i for i, start in enumerate(self.offsets) if start <= index)
            ordinal = index - self.offsets[shard]
            indexed = self._scan(shard)
            if ordinal >= len(indexed):
                raise UnreadableImageError(f"{self.urls[shard]}#{ordinal}", "fewer samples than its count")
            path = local_path(self.urls[shard]) or ""
            sample = indexed[ordinal]
            return self.decode(read_indexed(path, sample), f"{self.urls[shard]}:{sample.key}")
        preview = self._first_samples()
        key, sample = preview[index % len(preview)]
        return self.decode(sample, f"{self.urls[0]}:{key}")

    def _scan(self, shard: int) -> list[IndexedSample]:
        if shard not in self._scanned:
            self._scanned[shard] = scan_shard(local_path(self.urls[shard]) or "")
        return self._scanned[shard]

    def _first_samples(self) -> list[tuple[str, Sample]]:
        if self._preview is None:
            preview = []
            for _, key, sample in self.samples(0):
                preview.append((key, sample))
                if len(preview) >= PREVIEW_SAMPLES:
                    break
            if not preview:
                raise DatasetNotFoundError(f"the first shard {self.urls[0]} holds no sample")
            self._preview = preview
        return self._preview


def shard_sizes(urls: Sequence[str], index: str | None) -> list[int] | None:
    """Samples per shard: from the index file, by scanning local shards, or None (remote, no index)."""
    if index:
        return read_index(index, urls)
    if any(local_path(u) is None for u in urls):
        return None
    return [len(scan_shard(local_path(u) or "")) for u in urls]


def build_webdataset(cfg: Any, split: str) -> ShardedImages:
    """`dataset.urls` for pretrain/train, `dataset.test_urls` for test (class labels in `label_key`)."""
    key = "test_urls" if split == "test" else "urls"
    urls_cfg = _cfg_get(cfg, key)
    if urls_cfg is None or str(urls_cfg) == "":
        if split == "test":
            raise DatasetNotFoundError(
                "webdataset has no test split: dataset.test_urls is null; set it to labelled shards."
            )
        raise DatasetNotFoundError(
            "webdataset: dataset.urls is not set; e.g. dataset.urls=/data/shards/train-{000000..001023}.tar "
            "(local paths, http(s)://, or pipe:<command> for object storage)."
        )
    urls = expand_urls(urls_cfg if isinstance(urls_cfg, str) else list(urls_cfg))
    check_local_shards(urls)
    index = _cfg_get(cfg, "test_index" if split == "test" else "index")
    sizes = shard_sizes(urls, index)
    if sizes is None and (split != "pretrain" or _cfg_get(cfg, "epoch_samples") is None):
        raise DatasetNotFoundError(
            f"webdataset: the sample counts of the remote shards of dataset.{key} are unknown. Set "
            "dataset.index=<index.json written by scripts/pack_shards.py> (one pass per epoch), or "
            "dataset.epoch_samples=N to stream shards drawn with replacement, N samples an epoch."
        )
    if sizes is not None and not sum(sizes):
        raise DatasetNotFoundError(f"webdataset: the {len(urls)} shards of dataset.{key} hold no sample")
    return ShardedImages(
        urls, sizes, list(_cfg_get(cfg, "image_keys") or ["jpg", "jpeg", "png", "webp"]),
        _cfg_get(cfg, "label_key"), _cfg_get(cfg, "num_classes"),
    )
