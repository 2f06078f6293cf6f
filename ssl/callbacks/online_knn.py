"""Online k-NN monitor: weighted k-NN top-1 on clean images every few epochs.

Uses un-augmented train and test images (never the training crops), the teacher's backbone
when there is one, and gathers features across ranks so every rank reports the same number.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset

from ssl.callbacks.periodic import is_due
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.eval.features import extract_features
from ssl.eval.knn_classifier import knn_accuracy


class OnlineKNN(pl.Callback):
    def __init__(
        self,
        dataset_cfg: Any,
        eval_sets: tuple[Dataset, Dataset],
        every_n_epochs: int = 1,
        k: int = 20,
        temperature: float = 0.07,
        max_train_samples: int | None = 10000,
        max_test_samples: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        self.dataset_cfg = dataset_cfg
        self.eval_sets = eval_sets
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature
        self.max_train_samples = max_train_samples
        self.max_test_samples = max_test_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.last: dict[str, float] = {}

    @staticmethod
    def labelled_eval_sets(dataset_cfg: Any) -> tuple[Dataset, Dataset] | None:
        """The labelled train and test splits k-NN needs (built once), or None without them."""
        try:
            train, test = build_dataset(dataset_cfg, "train"), build_dataset(dataset_cfg, "test")
        except (FileNotFoundError, ValueError):
            return None
        return (train, test) if train.has_labels and test.has_labels else None

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if is_due(trainer, self.every_n_epochs):
            self.evaluate(trainer, module)

    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, float]:
        shard = (trainer.global_rank, trainer.world_size)
        backbone = module.eval_backbone()
        was_training = backbone.training
        backbone.eval()
        loaders = [
            clean_loader(data, self.dataset_cfg, self.batch_size, self.num_workers, shard, limit)
            for data, limit in zip(self.eval_sets, (self.max_train_samples, self.max_test_samples))
        ]
        with torch.no_grad():
            train_x, train_y = extract_features(backbone, loaders[0], module.device)
            test_x, test_y = extract_features(backbone, loaders[1], module.device)
        backbone.train(was_training)
        result = knn_accuracy(train_x, train_y, test_x, test_y, self.k, self.temperature)
        self.last = result
        module.log_dict(
            {"knn/top1": result["top1"], "knn/top5": result["top5"]},
            prog_bar=False, sync_dist=False, rank_zero_only=True,
        )
        return result
