"""The frozen encoder an evaluation measures: a checkpoint, an export, or a baseline.

Shared by the k-NN and linear-probe CLIs so both read the same `checkpoint` / `weights` /
`backbone` / `pixels` / `dataset` keys the same way and compare like with like.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.eval.features import extract_features
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
    """Frozen features of the clean train and test splits, and what produced them."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    dataset_cfg: DictConfig
    evaluated: str
    seconds: float


def labelled_features(cfg: DictConfig, purpose: str) -> LabelledFeatures:
    """Resolve the encoder, check both splits have labels, extract features once (progress bar)."""
    torch.manual_seed(cfg.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    encoder, dataset_cfg, what = resolve_encoder(cfg)
    splits = {split: build_dataset(dataset_cfg, split) for split in ("train", "test")}
    for split, data in splits.items():
        if not data.has_labels:
            raise ValueError(f"the {split} split of {dataset_cfg.name} has no labels: {purpose} needs them")
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device).eval()
    limits = {"train": cfg.max_train_samples, "test": cfg.max_test_samples}
    start = time.perf_counter()
    features = [
        extract_features(
            encoder, clean_loader(data, dataset_cfg, cfg.batch_size, cfg.num_workers, max_samples=limits[s]),
            device, progress=True,
        )
        for s, data in splits.items()
    ]
    (train_x, train_y), (test_x, test_y) = features
    return LabelledFeatures(train_x, train_y, test_x, test_y, dataset_cfg, what, time.perf_counter() - start)
