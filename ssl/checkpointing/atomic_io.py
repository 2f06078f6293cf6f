"""Checkpoints written to a temporary file in the same directory, fsync'ed, then renamed.

Lightning's `TorchCheckpointIO` writes through an fsspec transaction whose temporary file lives
in the system temp directory; when that is another filesystem the final "move" is a copy into
the checkpoint's path, and a crash during it leaves a truncated `last.ckpt`. Here a save either
replaces the previous file whole (`os.replace` is atomic within a directory) or leaves it
untouched plus a `<name>.tmp-<pid>` leftover, which `remove_partial_saves` deletes on the next start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

TMP_MARKER = ".tmp-"


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)` such that `path` always holds either the old or the new whole file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TMP_MARKER}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    return path


def remove_partial_saves(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of saves a crash interrupted; returns what was removed."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    partial = [p for p in directory.iterdir() if TMP_MARKER in p.name and p.is_file()]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin: `atomic_torch_save` for every checkpoint (last.ckpt included)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)
