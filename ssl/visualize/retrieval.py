"""k-NN retrieval pictures: query images next to their nearest train images by cosine similarity.

The similarity is the one the k-NN classifier votes with (L2-normalised global features), so the
picture shows what the classifier sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image

from ssl.visualize.attention import DISPLAY_SIZE, to_picture

MATCH = torch.tensor([0.10, 0.75, 0.20])  # frame of a neighbour with the query's label
MISMATCH = torch.tensor([0.90, 0.10, 0.10])  # and of one with another label
QUERY = torch.tensor([0.15, 0.35, 0.95])


@torch.no_grad()
def nearest_neighbours(
    queries: torch.Tensor, keys: torch.Tensor, k: int = 5, exclude_self: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices [Q, k] of each query's k nearest keys, nearest first.

    `exclude_self`: queries are the keys themselves (row i is key i); each drops itself.
    """
    q = F.normalize(queries.float(), dim=1)
    keys = F.normalize(keys.float(), dim=1)
    sims = q @ keys.T
    if exclude_self:
        sims.fill_diagonal_(float("-inf"))
    return sims.topk(min(k, keys.shape[0] - int(exclude_self)), dim=1)


def frame(pixels: torch.Tensor, colour: torch.Tensor, width: int) -> torch.Tensor:
    """[3, H, W] image with a coloured border `width` pixels wide (a copy)."""
    out = pixels.clone()
    c = colour.view(3, 1, 1)
    out[:, :width], out[:, -width:] = c, c
    out[:, :, :width], out[:, :, -width:] = c, c
    return out


def retrieval_grid(
    query_pixels: torch.Tensor,
    neighbour_pixels: torch.Tensor,
    matches: torch.Tensor | None = None,
) -> Image.Image:
    """One row per query: the query (blue frame), then its neighbours, nearest first.

    `query_pixels` [Q, 3, H, W] and `neighbour_pixels` [Q, k, 3, H, W] in [0, 1]; `matches` [Q, k]
    (neighbour label == query label) frames neighbours green or red.
    """
    queries, k = neighbour_pixels.shape[:2]
    # Enlarged before framing, so the frames stay thin (to_picture then leaves the size alone).
    scale = max(1, -(-DISPLAY_SIZE // query_pixels.shape[-1]))
    query_big = F.interpolate(query_pixels.float().cpu(), scale_factor=scale, mode="nearest")
    neighbours_big = F.interpolate(
        neighbour_pixels.float().cpu().flatten(0, 1), scale_factor=scale, mode="nearest"
    ).unflatten(0, (queries, k))
    width = max(2, query_big.shape[-1] // 32)
    rows = []
    for i in range(queries):
        rows.append(frame(query_big[i], QUERY, width))
        for j in range(k):
            image = neighbours_big[i, j]
            if matches is not None:
                image = frame(image, MATCH if bool(matches[i, j]) else MISMATCH, width)
            rows.append(image)
    return to_picture(torch.stack(rows), columns=k + 1)
