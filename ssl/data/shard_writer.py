"""Writes tar shards in webdataset layout, plus the `index.json` of their sample counts.

Members are written in key order with fixed metadata (mtime 0, mode 644, no owner), so packing
the same images twice gives byte-identical shards. The index lets a run know every shard's
size without opening it (remote shards, or many local ones): `dataset.index=<dir>/index.json`.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from types import TracebackType

from ssl.data.tar_shards import Sample

INDEX_FORMAT = "ssl-shards/1"


class ShardWriter:
    """`write(key, sample)` appends a sample; a new shard starts every `samples_per_shard` samples."""

    def __init__(self, out_dir: str, prefix: str = "train", samples_per_shard: int = 1000) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard={samples_per_shard}: must be >= 1")
        self.out_dir, self.prefix, self.samples_per_shard = out_dir, prefix, int(samples_per_shard)
        os.makedirs(out_dir, exist_ok=True)
        self.counts: list[int] = []
        self._archive: tarfile.TarFile | None = None

    def _name(self, shard: int) -> str:
        return f"{self.prefix}-{shard:06d}.tar"

    def write(self, key: str, sample: Sample) -> None:
        if "." in os.path.basename(key):
            raise ValueError(f"sample key {key!r} has a dot in its file name: webdataset splits keys there")
        if self._archive is None or self.counts[-1] >= self.samples_per_shard:
            self._close_shard()
            self._archive = tarfile.open(os.path.join(self.out_dir, self._name(len(self.counts))), "w")
            self.counts.append(0)
        for ext in sorted(sample):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(sample[ext]), 0, 0o644
            self._archive.addfile(info, io.BytesIO(sample[ext]))
        self.counts[-1] += 1

    def _close_shard(self) -> None:
        if self._archive is not None:
            self._archive.close()
            self._archive = None

    def close(self) -> str:
        """Finish the last shard and write index.json; returns the shards' brace pattern."""
        self._close_shard()
        entries = [{"name": self._name(i), "samples": n} for i, n in enumerate(self.counts)]
        with open(os.path.join(self.out_dir, "index.json"), "w") as f:
            json.dump({"format": INDEX_FORMAT, "shards": entries}, f, indent=1)
        return self.pattern()

    def pattern(self) -> str:
        last = max(len(self.counts) - 1, 0)
        return os.path.join(self.out_dir, f"{self.prefix}-{{000000..{last:06d}}}.tar")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()
