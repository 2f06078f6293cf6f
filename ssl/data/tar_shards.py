"""Samples of a tar shard in webdataset layout, read with the standard library's `tarfile`.

A shard is a plain tar whose members `<key>.<ext>` are grouped by key: `n01440764_10026.jpg`
and `n01440764_10026.cls` are one sample `{"jpg": ..., "cls": ...}`. The key is the member path
up to the first dot of its file name, as webdataset splits it, so its shards read here and ours
read there.

Why `tarfile` and not the webdataset package: resuming exactly needs the position of a stream
down to the sample (which shard, how many samples into it) and control of every draw of the
shuffle buffer; webdataset's pipeline hides both inside generators. Reading a tar sequentially
is all a stream needs, and it keeps the dependency optional (only for exotic URL schemes).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

Sample = dict[str, bytes]  # extension (lower case) -> the member's bytes


class ShardReadError(OSError):
    """A shard that stops being readable part-way (truncated, corrupt): `read` samples came out."""

    def __init__(self, url: str, read: int, reason: str) -> None:
        super().__init__(f"{url}: unreadable after {read} samples ({reason})")
        self.url, self.read, self.reason = url, read, reason


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member path: `a/b.seg.png` -> (`a/b`, `seg.png`), as webdataset does."""
    folder, base = os.path.split(name)
    stem, dot, ext = base.partition(".")
    return (os.path.join(folder, stem) if folder else stem), (ext.lower() if dot else "")


def _skipped(member: tarfile.TarInfo) -> bool:
    """Directories, links, and names webdataset ignores (hidden or `__`-prefixed metadata)."""
    base = os.path.basename(member.name)
    return not member.isfile() or base.startswith((".", "__"))


def iter_samples(stream: IO[bytes], url: str, skip: int = 0) -> Iterator[tuple[int, str, Sample]]:
    """`(ordinal, key, sample)` for every sample of a tar stream, in order; the first `skip` only read.

    Skipped samples are not assembled (no member is copied), which is what resuming inside a
    shard costs. A stream that breaks part-way raises `ShardReadError` after the samples it gave.
    """
    ordinal, key, sample = 0, None, {}
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as archive:
            for member in archive:
                if _skipped(member):
                    continue
                member_key, ext = split_key(member.name)
                if member_key != key:
                    if key is not None:
                        if ordinal >= skip:
                            yield ordinal, key, sample
                        ordinal += 1
                    key, sample = member_key, {}
                if ordinal >= skip:
                    handle = archive.extractfile(member)
                    sample[ext] = handle.read() if handle is not None else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as error:
        raise ShardReadError(url, ordinal, f"{type(error).__name__}: {error}") from error
    if key is not None and ordinal >= skip:
        yield ordinal, key, sample


@dataclass(frozen=True)
class IndexedSample:
    """Where one sample's members sit in a local uncompressed shard: ext -> (offset, size)."""

    key: str
    members: dict[str, tuple[int, int]]


def scan_shard(path: str) -> list[IndexedSample]:
    """Every sample of a local shard with its members' byte ranges, from the headers alone.

    Reads one 512-byte header per member (tarfile seeks over the data), so counting a shard
    costs little next to reading it; compressed shards are read through once instead.
    """
    samples: list[IndexedSample] = []
    try:
        with tarfile.open(path, mode="r:*") as archive:
            for member in archive:
                if _skipped(member):
                    continue
                key, ext = split_key(member.name)
                if not samples or samples[-1].key != key:
                    samples.append(IndexedSample(key, {}))
                samples[-1].members[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ShardReadError(path, len(samples), f"{type(error).__name__}: {error}") from error
    return samples


def read_indexed(path: str, sample: IndexedSample) -> Sample:
    """The members of one indexed sample, read by seeking (random access for previews)."""
    out: Sample = {}
    with open(path, "rb") as f:
        for ext, (offset, size) in sample.members.items():
            f.seek(offset)
            out[ext] = f.read(size)
    return out
