"""Tar shards written by the tests themselves (no network): noise PNGs with a `cls` label."""

from __future__ import annotations

import io
from collections.abc import Collection
from pathlib import Path

import numpy as np
from PIL import Image

from ssl.data.shard_writer import ShardWriter


def png(index: int, size: int = 12) -> bytes:
    """Image `index` as PNG bytes: noise seeded by the index, so every test can rebuild it."""
    pixels = (np.random.default_rng(index).random((size, size, 3)) * 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "png")
    return out.getvalue()


def write_shards(folder: Path, count: int, per_shard: int, corrupt: Collection[int] = (),
                 size: int = 12, classes: int = 3) -> str:
    """`count` samples in shards of `per_shard`; samples in `corrupt` get undecodable bytes.

    Returns the brace pattern of the shards (index.json beside them)."""
    with ShardWriter(str(folder), samples_per_shard=per_shard) as writer:
        for i in range(count):
            image = b"not an image" if i in corrupt else png(i, size)
            writer.write(f"sample{i:06d}", {"png": image, "cls": str(i % classes).encode()})
    return writer.pattern()


def shard_config(pattern: str, **overrides: object) -> dict:
    """A `dataset=webdataset` node over the test shards (28 px crops, as Fashion-MNIST's)."""
    node = {
        "name": "webdataset", "urls": pattern, "index": None, "test_urls": None, "test_index": None,
        "image_keys": ["png"], "label_key": "cls", "num_classes": 3, "epoch_samples": None,
        "shuffle_buffer": 8, "shuffle_shards": True, "download": False, "image_size": 12,
        "local_crop_size": 8, "patch_size": 4, "global_crop_scale": [0.4, 1.0],
        "local_crop_scale": [0.05, 0.4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
    }
    node.update(overrides)
    return node
