"""A linear probe on frozen features of *augmented* crops: DINO's linear evaluation protocol
(eval_linear.py), SGD for 100 epochs; `probe.protocol=dino` runs it on any objective's encoder.

Slower than the fast cached-feature probe (the frozen backbone runs on every augmented crop of
every epoch) but the protocol most DINO-family papers report. Train crops: RandomResizedCrop to
the image size + horizontal flip; test: the clean evaluation transform. Linear layer with weights
N(0, 0.01) and zero bias, SGD momentum 0.9, lr 0.001 x batch / 256, weight decay 0, cosine
annealing per epoch to 0. ViTs use the CLS tokens of the last 4 blocks (DINO's ViT-S setting).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from ssl.data.datamodule import TransformedDataset, clean_loader, collate_readable
from ssl.data.pil_ops import ToNormalizedTensor
from ssl.eval.metrics import topk_accuracy


def augmented_train_transform(image_size: int, mean: tuple, std: tuple) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), ToNormalizedTensor(mean, std),
    ])


def dino_linear_protocol(
    encode: Callable[[torch.Tensor], torch.Tensor],
    train_data: Dataset,
    test_data: Dataset,
    dataset_cfg: Any,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.001,
    batch_size: int = 256,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_workers: int = 2,
    device: torch.device | str = "cpu",
    seed: int = 0,
    max_train_samples: int | None = None,
) -> dict[str, Any]:
    """Train the linear layer on augmented crops; returns test top-1 / top-5 and the settings."""
    generator = torch.Generator().manual_seed(seed)
    mean, std = tuple(dataset_cfg.mean), tuple(dataset_cfg.std)
    train_set: Dataset = TransformedDataset(
        train_data, augmented_train_transform(dataset_cfg.image_size, mean, std), "image"
    )
    if max_train_samples and max_train_samples < len(train_set):
        step = len(train_set) / max_train_samples
        train_set = torch.utils.data.Subset(train_set, [int(i * step) for i in range(max_train_samples)])
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, num_workers=num_workers,
                        generator=generator, drop_last=False, collate_fn=collate_readable)
    with torch.no_grad():
        probe_input = next(iter(clean_loader(test_data, dataset_cfg, 2, 0)))["image"].to(device)
        dim = encode(probe_input).shape[1]
    torch.manual_seed(seed)
    linear = nn.Linear(dim, num_classes).to(device)
    nn.init.normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    scaled_lr = lr * batch_size / 256
    optimizer = torch.optim.SGD(
        linear.parameters(), lr=scaled_lr, momentum=momentum, weight_decay=weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=0)
    for _ in range(epochs):
        for batch in loader:
            with torch.no_grad():
                features = encode(batch["image"].to(device)).float()
            loss = F.cross_entropy(linear(features), batch["label"].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    scores, labels = [], []
    with torch.no_grad():
        for batch in clean_loader(test_data, dataset_cfg, batch_size, num_workers):
            scores.append(linear(encode(batch["image"].to(device)).float()))
            labels.append(batch["label"].to(device))
    accuracy = topk_accuracy(torch.cat(scores), torch.cat(labels))
    return {"protocol": "dino", **accuracy, "epochs": epochs, "lr": scaled_lr, "batch_size": batch_size,
            "weight_decay": weight_decay, "train_size": len(train_set), "feature_dim": dim}
