"""Online linear probe: a linear classifier trained alongside pretraining, on detached features.

A cheap running answer to "are the features getting linearly separable?" without stopping the
run (solo-learn's online classifier). Each training step it takes the batch's first view and
labels, computes the student backbone's global vector in eval mode without gradient (the
backbone's BatchNorm statistics and gradients are untouched), and takes one SGD step on its own
linear layer; gradients are averaged over ranks so every rank holds the same classifier. Every
N epochs it scores top-1 / top-5 on the clean test split. Its weights and optimizer state ride in
the checkpoint. Optional (`online_linear.enabled=true`): the extra forward costs about a third of
a step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ssl.callbacks.periodic import is_due
from ssl.data.datamodule import clean_loader
from ssl.data.spec import PLAIN_VIEWS, VIEWS
from ssl.distributed import all_reduce_sum, world_size
from ssl.eval.features import extract_features
from ssl.eval.metrics import topk_accuracy


def first_view(batch: Mapping[str, Any]) -> torch.Tensor:
    """The first augmented view of any objective's batch (multi-crop global, or plain crop)."""
    for key in (VIEWS, PLAIN_VIEWS):
        if batch.get(key):
            return batch[key][0]
    raise KeyError("the batch holds no views")


class OnlineLinearProbe(pl.Callback):
    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        dataset_cfg: Any,
        test_set: Dataset,
        every_n_epochs: int = 1,
        lr: float = 0.1,
        momentum: float = 0.9,
        max_test_samples: int | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> None:
        self.linear = nn.Linear(in_dim, num_classes)
        self.optimizer = torch.optim.SGD(self.linear.parameters(), lr=lr, momentum=momentum)
        self.dataset_cfg = dataset_cfg
        self.test_set = test_set
        self.every_n_epochs = max(1, int(every_n_epochs))
        self.max_test_samples = max_test_samples
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.last: dict[str, float] = {}

    def on_fit_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.linear.to(module.device)
        for state in self.optimizer.state.values():  # momentum restored from a checkpoint
            for key, value in state.items():
                if torch.is_tensor(value):
                    state[key] = value.to(module.device)

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        labels = batch["label"]
        known = labels >= 0  # unlabeled images (label -1) do not train the probe
        backbone = module.backbone
        was_training = backbone.training
        backbone.eval()
        with torch.no_grad():
            features = backbone(first_view(batch)).float()
        backbone.train(was_training)
        # Every image goes through and unlabeled ones weigh 0: selecting the labeled ones would size
        # the batch from the data, a host sync on GPUs. A batch without labels gives a zero loss,
        # which still joins the gradient all-reduce.
        count = known.sum()
        with torch.enable_grad():
            logits = self.linear(features)
            losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            loss = torch.where(known, losses, 0.0).sum() / count.clamp(min=1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        if world_size() > 1:
            for param in self.linear.parameters():
                all_reduce_sum(param.grad).div_(world_size())
        self.optimizer.step()
        with torch.no_grad():
            correct = (logits.argmax(dim=1) == labels).sum()  # label -1 never matches
            top1 = 100.0 * correct / count.clamp(min=1)
            # NaN, not 0, for a batch without labels.
            metrics = {
                "online_linear/train_loss": torch.where(count > 0, loss.detach(), torch.nan),
                "online_linear/train_top1": torch.where(count > 0, top1, torch.nan),
            }
        module.log_dict(metrics, batch_size=len(labels))

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if is_due(trainer, self.every_n_epochs):
            self.evaluate(trainer, module)

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, float]:
        """Top-1 / top-5 of the probe on clean test images (each rank a shard, gathered)."""
        backbone = module.backbone
        was_training = backbone.training
        backbone.eval()
        loader = clean_loader(self.test_set, self.dataset_cfg, self.batch_size, self.num_workers,
                              (trainer.global_rank, trainer.world_size), self.max_test_samples)
        features, labels = extract_features(backbone, loader, module.device)
        backbone.train(was_training)
        self.last = topk_accuracy(self.linear(features), labels)
        module.log_dict({f"online_linear/{k}": v for k, v in self.last.items()}, rank_zero_only=True)
        return self.last

    def state_dict(self) -> dict[str, Any]:
        return {"linear": self.linear.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.linear.load_state_dict(state_dict["linear"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
