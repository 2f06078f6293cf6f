"""Run a backbone over a list of crops, one forward pass per run of equal-size crops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


def encode_crops(
    encode: Callable[[torch.Tensor], torch.Tensor], crops: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Concatenate consecutive crops of the same resolution, encode each group once.

    Returns [(n_crops * B), ...] in crop order (crop 0 rows, crop 1 rows, ...), as DINO's
    MultiCropWrapper does: 2 globals + N locals cost two backbone passes, not 2 + N.
    """
    outputs = []
    start = 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        outputs.append(encode(torch.cat(list(crops[start:end]))))
        start = end
    return torch.cat(outputs)
