"""Extract backbone features from clean images, gathered across ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ssl.distributed import all_gather_cat


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str = "cpu",
    gather: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and labels [N] for every (image, label) batch of `loader`.

    Under DDP each rank sees a shard; with `gather` the shards are concatenated on every rank.
    """
    feats, labels = [], []
    batches = loader
    if progress:
        import sys

        from tqdm import tqdm

        batches = tqdm(loader, desc="features", leave=False, disable=not sys.stderr.isatty())
    for batch in batches:
        images, targets = batch["image"], batch["label"]
        feats.append(encode(images.to(device, non_blocking=True)).float())
        labels.append(targets.to(device))
    features, targets = torch.cat(feats), torch.cat(labels)
    if gather:
        features, targets = all_gather_cat(features), all_gather_cat(targets)
    return features, targets
