"""Lightning data module: multi-crop views for pretraining, clean images for evaluation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ssl.data.datasets import build_dataset
from ssl.data.views import MultiCropTransform, eval_transform
from ssl.objectives.base import ViewSpec


class TransformedDataset(Dataset):
    """Applies `transform` to a (PIL image, label) dataset and returns dicts with the index.

    key="views" for the pretraining views (a list of crops), key="image" for evaluation. The
    per-sample index lets objectives keep per-instance state (CoKe's label memory).
    """

    def __init__(self, dataset: Dataset, transform: Callable, key: str) -> None:
        self.dataset = dataset
        self.transform = transform
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.dataset[index]
        return {self.key: self.transform(image), "label": label, "index": index}


def merge_view_specs(specs: list[ViewSpec]) -> ViewSpec:
    """The union of what several objectives need: the most global and local crops any asks for."""
    return ViewSpec(
        global_crops=max((s.global_crops for s in specs), default=1),
        local_crops=max((s.local_crops for s in specs), default=0),
    )


class PretrainDataModule(pl.LightningDataModule):
    """Train loader of multi-crop views (per the objectives' ViewSpec) from `dataset` config."""

    def __init__(
        self,
        dataset_cfg: Any,
        views: ViewSpec,
        batch_size: int,
        num_workers: int,
        dataset: Dataset | None = None,
    ) -> None:
        """`dataset`: the already built "pretrain" split, so a folder is not scanned twice."""
        super().__init__()
        self.dataset_cfg = dataset_cfg
        self.views = views
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset = dataset
        self.train_set: Dataset | None = None

    def multicrop(self) -> MultiCropTransform:
        return MultiCropTransform.from_config(
            self.dataset_cfg, self.views.global_crops, self.views.local_crops
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if self.dataset is None:
                self.dataset = build_dataset(self.dataset_cfg, "pretrain")
            self.train_set = TransformedDataset(self.dataset, self.multicrop(), "views")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            shuffle=True,
            drop_last=len(self.train_set) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )


def clean_loader(
    dataset: Dataset,
    dataset_cfg: Any,
    batch_size: int,
    num_workers: int,
    shard: tuple[int, int] = (0, 1),
    max_samples: int | None = None,
) -> DataLoader:
    """Un-augmented (resized / centre-cropped) images of a raw dataset for k-NN and probes.

    `shard=(rank, world)` gives each rank a disjoint slice; `max_samples` takes an evenly spaced
    subset (the same on every rank) to bound the cost of an online monitor.
    """
    transform = eval_transform(dataset_cfg.image_size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std))
    data = TransformedDataset(dataset, transform, "image")
    indices = list(range(len(data)))
    if max_samples and max_samples < len(indices):
        step = len(indices) / max_samples
        indices = [int(i * step) for i in range(max_samples)]
    rank, world = shard
    subset = torch.utils.data.Subset(data, indices[rank::world])
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
