"""The frozen encoder an evaluation measures (a checkpoint, an export, or a baseline) and its features.

Shared by the k-NN and linear-probe CLIs so both read the same `checkpoint` / `weights` /
`backbone` / `pixels` / `dataset` keys the same way, and so the features one extracts are
cached on disk for the other (ssl/eval/cache.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.data.eval_transform import eval_transform
from ssl.eval.cache import FeatureCache, cache_directory, cache_key, dataset_identity, encoder_identity
from ssl.eval.feature_parts import assemble, part_encoder, primary_part
from ssl.eval.features import extract_parts
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
        return build_backbone(cfg.backbone), dataset_cfg, f"{cfg.backbone.name} at random init"
    raise ValueError(
        "nothing to evaluate: pass checkpoint=<.ckpt or .safetensors>, backbone=<name> "
        "(random-init baseline) or pixels=true"
    )


@dataclass
class LabelledFeatures:
    """Frozen feature parts of the clean train and test splits, and what produced them.

    `train_x` / `test_x` are the encoder's global vector (what k-NN uses); `variant(name)` builds
    the concatenations a linear probe may be trained on ("cls+avgpool", "last4", ...).
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


def labelled_features(
    cfg: DictConfig, purpose: str, parts: Iterable[str] | None = None, encoder_info: tuple | None = None
) -> LabelledFeatures:
    """Resolve the encoder, check both splits have labels, and get each requested part of each split.

    Parts in the cache are read; the missing ones are extracted in one batched pass per split
    (progress bar on a terminal) and written to the cache. `parts=None`: the global vector only.
    """
    torch.manual_seed(cfg.seed)
    device = eval_device(cfg)
    encoder, dataset_cfg, what = encoder_info or resolve_encoder(cfg)
    wanted = list(parts) if parts is not None else [primary_part(encoder)]
    splits = labelled_splits(dataset_cfg, purpose)
    cache = FeatureCache(cache_directory(cfg))
    transform = repr(eval_transform(dataset_cfg.image_size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std)))
    limits = {"train": cfg.max_train_samples, "test": cfg.max_test_samples}
    identity = {
        "encoder": encoder_identity(cfg), "dataset": dataset_identity(dataset_cfg), "transform": transform,
    }
    moved = False
    results: dict[str, tuple[dict[str, torch.Tensor], torch.Tensor]] = {}
    extracted_images, extract_seconds = 0, 0.0
    start = time.perf_counter()
    cached: dict[str, str] = {}
    for split, data in splits.items():
        keys = {part: cache_key({**identity, "split": split, "limit": limits[split], "part": part})
                for part in wanted}
        found = {part: cache.load(key) for part, key in keys.items()}
        missing = [part for part, entry in found.items() if entry is None]
        split_parts = {part: entry["features"] for part, entry in found.items() if entry is not None}
        labels = next((entry["labels"] for entry in found.values() if entry is not None), None)
        if missing:
            if isinstance(encoder, torch.nn.Module) and not moved:
                encoder = encoder.to(device).eval()
                moved = True
            loader = clean_loader(
                data, dataset_cfg, cfg.batch_size, cfg.num_workers, max_samples=limits[split]
            )
            began = time.perf_counter()
            new_parts, labels = extract_parts(part_encoder(encoder, missing), loader, device,
                                              progress=f"{split} features")
            extract_seconds += time.perf_counter() - began
            extracted_images += len(labels)
            for part in missing:
                description = {**identity, "split": split, "limit": limits[split], "part": part}
                cache.save(keys[part], {"features": new_parts[part], "labels": labels}, description)
            split_parts.update(new_parts)
        for part in keys:
            cached[f"{split}/{part}"] = "hit" if found[part] is not None else "miss"
        results[split] = ({p: v.to(device) for p, v in split_parts.items()}, labels.to(device))
    (train_parts, train_y), (test_parts, test_y) = results["train"], results["test"]
    return LabelledFeatures(
        train_parts, train_y, test_parts, test_y, dataset_cfg, what, primary_part(encoder),
        time.perf_counter() - start,
        images_per_s=extracted_images / extract_seconds if extracted_images else None,
        cache_hits=cache.hits, cache_misses=cache.misses, cached=cached,
    )
