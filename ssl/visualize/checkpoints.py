"""What the notebooks share: which checkpoint, where figures go, the run's module, images and features.

Kept here (and tested) so that each notebook is a few short cells.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from ssl.callbacks.reconstructions import can_reconstruct, reconstruction_grid
from ssl.data.datamodule import clean_loader, evenly_spaced_images
from ssl.data.datasets import build_dataset
from ssl.data.eval_transform import eval_transform
from ssl.export import read_checkpoint
from ssl.module import SSLModule

DEFAULT_OUTPUT = Path("notebooks") / "output"


def run_objectives(checkpoint: Path) -> set[str]:
    """Objective names in the run's `config.yaml` beside `checkpoints/` (empty when unreadable)."""
    config = checkpoint.parent.parent / "config.yaml"
    try:
        return set(OmegaConf.load(config).get("objective") or {})
    except (OSError, ValueError, yaml.YAMLError):
        return set()


def find_checkpoint(
    path: str | Path | None = None, runs: str | Path = "runs", objectives: Sequence[str] = ()
) -> Path:
    """`path` when given, else the newest `<runs>/**/checkpoints/last.ckpt`.

    With `objectives`, only runs with one of them count. Notebooks pass their
    `SSL_NOTEBOOK_CHECKPOINT` here; the fallback finds the last local run.
    """
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        return Path(path)
    found = sorted(Path(runs).glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if objectives:
        found = [p for p in found if run_objectives(p) & set(objectives)]
    if not found:
        which = f" of a run with objective {' or '.join(objectives)}" if objectives else ""
        raise FileNotFoundError(
            f"no checkpoint{which} under {runs}/: set SSL_NOTEBOOK_CHECKPOINT=<run>/checkpoints/last.ckpt "
            "or pretrain one first (python -m ssl.pretrain experiment=quickstart writes one under runs/)"
        )
    return found[-1]


def output_dir(path: str | Path | None = None) -> Path:
    """Where a notebook saves its figures (created): `path`, else notebooks/output."""
    out = Path(path or DEFAULT_OUTPUT)
    out.mkdir(parents=True, exist_ok=True)
    return out


def load_module(checkpoint: str | Path) -> tuple[SSLModule, dict[str, Any]]:
    """The whole training module (backbone, objectives with their heads, teacher), in eval mode.

    Rebuilt from the checkpoint's own config, so objectives' decoders come back for
    reconstructions; the state dict must match exactly.
    """
    from ssl.pretrain import build_module  # Hydra's entry module; only needed here

    config, state = read_checkpoint(checkpoint)
    module = build_module(OmegaConf.create(config))
    module.load_state_dict(state)
    return module.eval(), config


def dataset_config(config: dict[str, Any]) -> DictConfig:
    """The run's dataset node (root, image size, normalisation)."""
    return OmegaConf.create(config["dataset"])


def class_names(dataset_cfg: Any, split: str = "test") -> list[str]:
    """The split's class names (index = label), empty when the dataset has none."""
    return list(getattr(build_dataset(dataset_cfg, split), "classes", []) or [])


def clean_images(
    dataset_cfg: Any, split: str = "test", num_images: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Evenly spaced clean (normalised) images of a split and their labels: the same ones every time."""
    return evenly_spaced_images(build_dataset(dataset_cfg, split), dataset_cfg, num_images)


@torch.no_grad()
def encode_split(
    backbone: nn.Module, dataset_cfg: Any, split: str, max_samples: int | None = None, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global features [N, D], labels [N] and dataset indices [N] of (an evenly spaced subset of) a split."""
    data = build_dataset(dataset_cfg, split)
    loader = clean_loader(data, dataset_cfg, batch_size, num_workers=0, max_samples=max_samples)
    device = next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, labels, indices = [], [], []
    try:
        for batch in loader:
            features.append(backbone(batch["image"].to(device)).float().cpu())
            labels.append(torch.as_tensor(batch["label"]))
            indices.append(torch.as_tensor(batch["index"]))
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels), torch.cat(indices)


def split_images(dataset_cfg: Any, split: str, indices: torch.Tensor) -> torch.Tensor:
    """Clean (normalised) images of a split at the given dataset indices, [len(indices), 3, H, W]."""
    data = build_dataset(dataset_cfg, split)
    transform = eval_transform(dataset_cfg.image_size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std))
    return torch.stack([transform(data[int(i)][0]) for i in indices.flatten()])


@torch.no_grad()
def reconstruction_pictures(
    module: SSLModule, images: torch.Tensor, dataset_cfg: Any
) -> dict[str, Image.Image]:
    """{objective: grid} for each objective that reconstructs (MAE, MFM), drawn as the callback does."""
    mean = torch.tensor([float(m) for m in dataset_cfg.mean])
    std = torch.tensor([float(s) for s in dataset_cfg.std])
    pictures = {}
    for name, objective in module.objectives.items():
        if can_reconstruct(objective):
            rec = objective.reconstruct(images.to(module.device), module.backbone)
            pictures[name] = reconstruction_grid(rec, mean, std)
    return pictures
