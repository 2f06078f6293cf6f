"""Extract backbone features from clean images, gathered across ranks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch

from ssl.distributed import all_gather_cat, world_size


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True when `flag` holds on at least one rank (itself in one process)."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value)


@torch.no_grad()
def extract_indexed_parts(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    loader: Iterable,
    device: torch.device | str = "cpu",
    gather: bool = True,
    progress: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """{part: [N, D_part]}, labels [N] and dataset indices [N] for every batch of `loader`, one pass.

    The indices (each batch's "index", None when a batch has none) say which image each row is:
    unreadable images are left out, so row i is not always image i, and a labelled subset is
    picked from cached features by index. Under DDP each rank sees a disjoint shard; with
    `gather` the shards are concatenated on every rank (features, labels and indices in the same
    order). `progress`: a tqdm description (shown on a TTY).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    labels, indices = [], []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=progress, leave=False, disable=not sys.stderr.isatty())
    # Ranks step together until every shard is done: shards differ by up to one image (so one
    # batch), and a batch of unreadable files is left out on one rank alone. A sharded (FSDP)
    # backbone gathers each block's weights from every rank in forward, so a rank that is done
    # repeats its last batch (results dropped) until the others are.
    images, iterator = None, iter(batches)
    while True:
        batch = next(iterator, None)
        if not any_rank(batch is not None, device):
            break
        if batch is None:
            if images is not None:
                encode(images)
            continue
        images, targets = batch["image"].to(device, non_blocking=True), batch["label"]
        for name, value in encode(images).items():
            parts.setdefault(name, []).append(value.float())
        labels.append(targets.to(device))
        index = batch.get("index") if isinstance(batch, dict) else None
        indices.append(None if index is None else torch.as_tensor(index).to(device))
    out = {name: torch.cat(values) for name, values in parts.items()}
    targets = torch.cat(labels)
    rows = torch.cat(indices) if indices and all(i is not None for i in indices) else None
    if gather:
        out = {name: all_gather_cat(value) for name, value in out.items()}
        targets = all_gather_cat(targets)
        rows = all_gather_cat(rows) if rows is not None else None
    return out, targets, rows


@torch.no_grad()
def extract_parts(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    loader: Iterable,
    device: torch.device | str = "cpu",
    gather: bool = True,
    progress: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{part: [N, D_part]} and labels [N] for every (image, label) batch of `loader`, one pass.

    `extract_indexed_parts` without the indices.
    """
    out, targets, _ = extract_indexed_parts(encode, loader, device, gather, progress)
    return out, targets


@torch.no_grad()
def extract_features(
    encode: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable,
    device: torch.device | str = "cpu",
    gather: bool = True,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] and labels [N]: `extract_parts` for a single feature vector."""
    parts, targets = extract_parts(
        lambda images: {"x": encode(images)}, loader, device, gather, "features" if progress else None
    )
    return parts["x"], targets
