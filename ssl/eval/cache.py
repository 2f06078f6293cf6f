"""On-disk cache of frozen features, so k-NN and the linear probe extract each split only once.

A cache entry is one feature part of one split, keyed by everything that determines it: the
encoder (checkpoint path, size and modification time, teacher or student weights; or the random
init's backbone config and seed; or raw pixels), the dataset (name, root, image size,
normalisation), the split and subset, the clean transform, and the part. Entries are written
atomically (temporary file + rename) and read with `weights_only=True`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

CACHE_FORMAT = 1
DEFAULT_CACHE_DIR = "~/.cache/ssl/features"


def encoder_identity(cfg: DictConfig) -> dict[str, Any]:
    """What distinguishes the evaluated encoder, from the evaluation config."""
    if cfg.pixels:
        return {"kind": "pixels"}
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).resolve()
        stat = path.stat()
        return {"kind": "file", "path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "weights": cfg.weights}
    backbone = OmegaConf.to_container(cfg.backbone, resolve=True) if cfg.get("backbone") else None
    # "init": entries written before the init was seeded at build time hold another draw's features.
    return {"kind": "random_init", "backbone": backbone, "seed": cfg.seed, "init": "seeded"}


def dataset_identity(dataset_cfg: DictConfig) -> dict[str, Any]:
    keys = ("name", "root", "test_root", "image_size", "mean", "std")
    container = OmegaConf.to_container(dataset_cfg, resolve=True)
    return {k: container.get(k) for k in keys}


def cache_key(parts: Mapping[str, Any]) -> str:
    """A short stable hash of a JSON-able description."""
    text = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


class FeatureCache:
    """Feature tensors by key in `directory` (None: caching off, every lookup misses)."""

    def __init__(self, directory: str | Path | None) -> None:
        self.directory = Path(os.path.expanduser(str(directory))) if directory else None
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path | None:
        return self.directory / f"{key}.pt" if self.directory else None

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged entry (any unpickling error) is recomputed, not fatal
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def save(self, key: str, tensors: Mapping[str, torch.Tensor], description: Mapping[str, Any]) -> None:
        path = self.path(key)
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({k: v.detach().cpu() for k, v in tensors.items()}, temporary)
        os.replace(temporary, path)
        path.with_suffix(".json").write_text(json.dumps(description, indent=2, default=str))


def cache_directory(cfg: DictConfig) -> str | None:
    """`cache_dir`, else $SSL_CACHE_DIR, else ~/.cache/ssl/features; None when `cache=false`."""
    if not cfg.get("cache", True):
        return None
    return cfg.get("cache_dir") or os.environ.get("SSL_CACHE_DIR") or DEFAULT_CACHE_DIR
