"""The frozen encoder an evaluation measures (a checkpoint, an export, or a baseline) and its features.

Shared by the k-NN and linear-probe CLIs so both read the same `checkpoint` / `weights` /
`backbone` / `pixels` / `dataset` keys the same way, and so the features one extracts are
cached on disk for the other (ssl/eval/cache.py).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ssl.backbones.base import Backbone
from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.data.eval_transform import eval_transform
from ssl.eval.cache import FeatureCache, cache_directory, cache_key, dataset_identity, encoder_identity
from ssl.eval.feature_parts import assemble, part_encoder, primary_part
from ssl.eval.features import extract_indexed_parts
from ssl.eval.labelled import labelled_train_split, pool_indices, rows_in_split
from ssl.export import load_checkpoint_backbone, load_exported_backbone


def resolve_encoder(cfg: DictConfig) -> tuple[Callable[[torch.Tensor], torch.Tensor], DictConfig, str]:
    """The feature function, the dataset config, and a description of what is evaluated."""
    dataset_cfg = cfg.get("dataset")
    if cfg.pixels:
        if dataset_cfg is None:
            raise ValueError("pixels=true needs a dataset: add dataset=<name>")
        mean = torch.tensor(list(dataset_cfg.mean))[:, None, None]
        std = torch.tensor(list(dataset_cfg.std))[:, None, None]

        def raw_pixels(x: torch.Tensor) -> torch.Tensor:
            """Undo the normalisation: the baseline is the image's [0, 1] pixel values."""
            return (x * std.to(x.device) + mean.to(x.device)).flatten(1)

        return raw_pixels, dataset_cfg, "raw pixels in [0, 1]"
    if not cfg.checkpoint and cfg.get("backbone") is None:
        raise ValueError(
            "nothing to evaluate: pass checkpoint=<.ckpt or .safetensors>, backbone=<name> "
            "(random-init baseline) or pixels=true"
        )
    return resolve_backbone(cfg)


def resolve_backbone(cfg: DictConfig) -> tuple[Backbone, DictConfig, str]:
    """The backbone of `checkpoint` (a Lightning .ckpt or an exported .safetensors) or a random-init
    `backbone=<name>`, the dataset config, and a description; shared by the frozen evaluations and
    fine-tuning, so all read `checkpoint` / `weights` / `backbone` / `dataset` the same way."""
    dataset_cfg = cfg.get("dataset")
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            if dataset_cfg is None:
                raise ValueError("exported weights carry no dataset: add dataset=<name>")
            return load_exported_backbone(path), dataset_cfg, f"exported backbone {path}"
        backbone, run_cfg = load_checkpoint_backbone(path, cfg.weights)
        if dataset_cfg is None:
            dataset_cfg = OmegaConf.create(run_cfg["dataset"])
        return backbone, dataset_cfg, f"{backbone.weights_source} backbone of {path}"
    if cfg.get("backbone") is not None:
        if dataset_cfg is None:
            raise ValueError("a random-init baseline needs a dataset: add dataset=<name>")
        return seeded_random_init(cfg.backbone, cfg.seed), dataset_cfg, f"{cfg.backbone.name} at random init"
    raise ValueError(
        "nothing to evaluate: pass checkpoint=<.ckpt or .safetensors> or backbone=<name> "
        "(random-init baseline)"
    )


def seeded_random_init(backbone_cfg: DictConfig, seed: int) -> Backbone:
    """`backbone_cfg` at the random init `seed` draws, whatever the RNG went through before.

    The feature cache names a random-init encoder by (backbone, seed); building it under its own
    seeded RNG keeps that name true, so cached train features and freshly encoded test images come
    from the same weights. The caller's RNG stream is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_backbone(backbone_cfg)


@dataclass
class LabelledFeatures:
    """Frozen feature parts of the clean train and test splits, and what produced them.

    `train_x` / `test_x` are the encoder's global vector (what k-NN uses); `variant(name)` builds
    the concatenations a linear probe may be trained on ("cls+avgpool", "last4", ...). With a
    labelled subset (`labelled_fraction`, ...) the train rows are only its images and `labelled`
    records the subset (ssl/eval/labelled.py); the test split stays whole.
    """

    train_parts: dict[str, torch.Tensor]
    train_y: torch.Tensor
    test_parts: dict[str, torch.Tensor]
    test_y: torch.Tensor
    dataset_cfg: DictConfig
    evaluated: str
    primary: str
    seconds: float
    images_per_s: float | None = None  # extraction throughput, None when every part came from the cache
    cache_hits: int = 0
    cache_misses: int = 0
    cached: dict[str, str] = field(default_factory=dict)
    labelled: dict[str, Any] | None = None  # the labelled subset of train (None: all of it)

    @property
    def train_x(self) -> torch.Tensor:
        return self.train_parts[self.primary]

    @property
    def test_x(self) -> torch.Tensor:
        return self.test_parts[self.primary]

    def variant(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, test) features of a variant: its parts concatenated."""
        return assemble(self.train_parts, name), assemble(self.test_parts, name)


def eval_device(cfg: DictConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def labelled_splits(dataset_cfg: DictConfig, purpose: str) -> dict[str, Any]:
    """The train and test splits, or a clear error when either has no labels."""
    splits = {split: build_dataset(dataset_cfg, split) for split in ("train", "test")}
    for split, data in splits.items():
        if not data.has_labels:
            raise ValueError(f"the {split} split of {dataset_cfg.name} has no labels: {purpose} needs them")
    return splits


def with_row_indices(
    entry: dict[str, torch.Tensor] | None, pool: np.ndarray
) -> dict[str, torch.Tensor] | None:
    """A cache entry with the dataset index of each row ("indices").

    Entries written before indices were stored hold one row per image of the pool when no image
    was unreadable: their indices are the pool. Otherwise which row is which image is unknown,
    and the entry counts as a miss (extracted again, now with indices).
    """
    if entry is None or "indices" in entry:
        return entry
    if len(entry["labels"]) == len(pool):
        return {**entry, "indices": torch.from_numpy(pool)}
    return None


def labelled_features(
    cfg: DictConfig, purpose: str, parts: Iterable[str] | None = None, encoder_info: tuple | None = None
) -> LabelledFeatures:
    """Resolve the encoder, check both splits have labels, and get each requested part of each split.

    Parts in the cache are read; the missing ones are extracted in one batched pass per split
    (progress bar on a terminal) and written to the cache. `parts=None`: the global vector only.
    A labelled subset of train is taken by dataset index from the whole split's cached rows when
    they are there; otherwise only its images are encoded, and cached under the subset's own key.
    It is drawn (and a bad `labelled_*` setting rejected) before anything is extracted.
    """
    torch.manual_seed(cfg.seed)
    device = eval_device(cfg)
    encoder, dataset_cfg, what = encoder_info or resolve_encoder(cfg)
    wanted = list(parts) if parts is not None else [primary_part(encoder)]
    splits = labelled_splits(dataset_cfg, purpose)
    subset, record = labelled_train_split(cfg, splits["train"])
    cache = FeatureCache(cache_directory(cfg))
    transform = repr(eval_transform(dataset_cfg.image_size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std)))
    limits = {"train": cfg.max_train_samples, "test": cfg.max_test_samples}
    identity = {
        "encoder": encoder_identity(cfg), "dataset": dataset_identity(dataset_cfg), "transform": transform,
    }
    moved = False
    results: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]] = {}
    extracted_images, extract_seconds = 0, 0.0
    start = time.perf_counter()
    cached: dict[str, str] = {}
    for split, data in splits.items():
        pool = pool_indices(len(data), limits[split])
        describe = {part: {**identity, "split": split, "limit": limits[split], "part": part}
                    for part in wanted}
        keys = {part: cache_key(description) for part, description in describe.items()}
        found = {part: with_row_indices(cache.load(key), pool) for part, key in keys.items()}
        only = None
        if split == "train" and subset is not None and any(entry is None for entry in found.values()):
            # The whole split is not cached: encode the labelled images alone (1 % of the work at 1 %).
            only = np.sort(subset.indices)
            rows_id = hashlib.sha256(only.astype(np.int64).tobytes()).hexdigest()[:16]
            describe = {part: {**d, "labelled_rows": rows_id, "labelled_count": len(only)}
                        for part, d in describe.items()}
            keys = {part: cache_key(description) for part, description in describe.items()}
            found = {part: with_row_indices(cache.load(key), only) for part, key in keys.items()}
        missing = [part for part, entry in found.items() if entry is None]
        split_parts = {part: entry["features"] for part, entry in found.items() if entry is not None}
        first = next((entry for entry in found.values() if entry is not None), None)
        labels, rows = (first["labels"], first["indices"]) if first is not None else (None, None)
        if missing:
            if isinstance(encoder, torch.nn.Module) and not moved:
                encoder = encoder.to(device).eval()
                moved = True
            loader = clean_loader(
                data, dataset_cfg, cfg.batch_size, cfg.num_workers, max_samples=limits[split], only=only
            )
            began = time.perf_counter()
            new_parts, labels, rows = extract_indexed_parts(part_encoder(encoder, missing), loader, device,
                                                            progress=f"{split} features")
            extract_seconds += time.perf_counter() - began
            extracted_images += len(labels)
            for part in missing:
                entry = {"features": new_parts[part], "labels": labels}
                cache.save(keys[part], entry if rows is None else {**entry, "indices": rows}, describe[part])
            split_parts.update(new_parts)
        for part in keys:
            cached[f"{split}/{part}"] = "hit" if found[part] is not None else "miss"
        results[split] = ({p: v.to(device) for p, v in split_parts.items()}, labels.to(device), rows)
    (train_parts, train_y, train_rows), (test_parts, test_y, _) = results["train"], results["test"]
    if subset is not None:
        keep = rows_in_split(train_rows, subset).to(device)
        train_parts, train_y = {p: v[keep] for p, v in train_parts.items()}, train_y[keep]
    return LabelledFeatures(
        train_parts, train_y, test_parts, test_y, dataset_cfg, what, primary_part(encoder),
        time.perf_counter() - start,
        images_per_s=extracted_images / extract_seconds if extracted_images else None,
        cache_hits=cache.hits, cache_misses=cache.misses, cached=cached, labelled=record,
    )
