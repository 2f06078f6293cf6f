"""Extract backbone features from clean images, gathered across ranks."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

import torch

from ssl.distributed import all_gather_cat, world_size


def batches_behind(loader: Iterable, device: torch.device | str) -> int:
    """How many fewer batches this rank's shard has than the largest (0 in one process).

    Shards differ by at most one image, which can mean one batch. A sharded (FSDP) backbone
    gathers each block's weights from every rank in forward, so every rank must run as many
    forwards as the others.
    """
    if world_size() == 1:
        return 0
    import torch.distributed as dist

    mine = torch.tensor([len(loader)], device=device)
    most = mine.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    return int(most - mine)


@torch.no_grad()
def extract_parts(
    encode: Callable[[torch.Tensor], dict[str, torch.Tensor]],
    loader: Iterable,
    device: torch.device | str = "cpu",
    gather: bool = True,
    progress: str | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """{part: [N, D_part]} and labels [N] for every (image, label) batch of `loader`, one pass.

    Under DDP each rank sees a disjoint shard; with `gather` the shards are concatenated on every
    rank (features and labels in the same order). `progress`: a tqdm description (shown on a TTY).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    labels = []
    batches = loader
    if progress:
        from tqdm import tqdm

        batches = tqdm(loader, desc=progress, leave=False, disable=not sys.stderr.isatty())
    images = None
    for batch in batches:
        images, targets = batch["image"].to(device, non_blocking=True), batch["label"]
        for name, value in encode(images).items():
            parts.setdefault(name, []).append(value.float())
        labels.append(targets.to(device))
    for _ in range(batches_behind(loader, device)):
        encode(images)  # results dropped: keeps FSDP's per-block gathers in step across ranks
    out = {name: torch.cat(values) for name, values in parts.items()}
    targets = torch.cat(labels)
    if gather:
        out = {name: all_gather_cat(value) for name, value in out.items()}
        targets = all_gather_cat(targets)
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
