"""Inverse block masks (data2vec 2.0 images): the *visible* tokens form a few square blocks.

fairseq's `compute_block_mask_2d` with `inverse_mask=True`, `require_same_masks=True`, no mask
dropout, overlapping blocks. With keep = 1 - mask_prob:
1. int(L * (keep + mask_prob_adjust) / mask_length**2) block centres, uniform over the L tokens
   (duplicates allowed);
2. each centre grows to a mask_length x mask_length square (offsets -len//2 .. len - 1 - len//2),
   clamped at the borders;
3. uniformly chosen single tokens are dropped from, or added to, the blocks until exactly
   int(L * keep) tokens are marked;
4. the marks are inverted: marked = visible, the rest is masked.
ViT-B at 224 px (14 x 14, mask_prob 0.8, length 3, adjust 0.07): 5 centres, 39 visible, 157 masked
in every row; ViT-L's 0.75 / 0.1 gives 147 masked. Every row masks the same count, so the
student's visible-token batch is a dense tensor and the loss needs no data-dependent shapes.

Step 3 draws the same distribution as fairseq's `torch.multinomial` on uniform weights (a
uniform subset) from one sort of noise, for the whole batch at once; the random streams differ.
Drawn in the collate step with the worker's seeded generator, like the other maskers.
"""

from __future__ import annotations

import torch


def inverse_block_counts(
    num_tokens: int, mask_prob: float, mask_length: int, mask_prob_adjust: float
) -> tuple[int, int]:
    """(block centres, visible tokens) per row, with fairseq's float arithmetic and truncation."""
    keep = 1 - mask_prob
    centres = int(num_tokens * ((keep + mask_prob_adjust) / mask_length**2))
    visible = int(num_tokens * keep)
    return centres, visible


def inverse_block_mask(
    batch_size: int,
    grid: tuple[int, int],
    mask_prob: float = 0.8,
    mask_length: int = 3,
    mask_prob_adjust: float = 0.07,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """[B, h * w] bool, True = masked; every row has the same number of visible tokens."""
    height, width = int(grid[0]), int(grid[1])
    num_tokens = height * width
    if mask_length < 2:
        raise ValueError(f"mask_length must be >= 2 for block masks, got {mask_length}")
    centres, visible = inverse_block_counts(num_tokens, mask_prob, mask_length, mask_prob_adjust)
    if not 0 < visible < num_tokens:
        raise ValueError(
            f"mask_prob {mask_prob} on a {height}x{width} grid leaves {visible} visible tokens: "
            "need at least one visible and one masked (a smaller patch or another mask_prob)"
        )
    marked = torch.zeros(batch_size, height, width)
    if centres > 0:
        picks = torch.randint(0, num_tokens, (batch_size, centres), generator=generator)
        rows, cols = picks // width, picks % width
        batch_index = torch.arange(batch_size).unsqueeze(1).expand_as(picks)
        offset = mask_length // 2
        for di in range(-offset, mask_length - offset):
            for dj in range(-offset, mask_length - offset):
                r = (rows + di).clamp(0, height - 1)
                c = (cols + dj).clamp(0, width - 1)
                marked[batch_index, r, c] = 1.0
    marked = marked.reshape(batch_size, num_tokens)
    # Marked tokens sort first, each group in a uniformly random order: the first `visible` are
    # a uniform subset of the marked (too many) or all of them plus a uniform subset of the rest.
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    order = torch.argsort(noise - 2.0 * marked, dim=1)
    keep = torch.zeros(batch_size, num_tokens, dtype=torch.bool)
    keep.scatter_(1, order[:, :visible], True)
    return ~keep


def visible_first_ids(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids_shuffle, ids_restore) [B, L]: visible tokens first, each group in raster order.

    fairseq's `make_maskinfo` (argsort of the mask) with a stable sort; ids_restore undoes it.
    """
    ids_shuffle = torch.argsort(mask.to(torch.uint8), dim=1, stable=True)
    return ids_shuffle, torch.argsort(ids_shuffle, dim=1)


class InverseBlockMasker:
    """Batch masker: `<prefix>_mask` [B * copies, L] bool and its `<prefix>_ids_shuffle` /
    `<prefix>_ids_restore`; `copies` independent masks per image, rows image-major
    (image 0's copies first), as data2vec 2.0's `clone_batch` repeat_interleave."""

    def __init__(
        self,
        grid: tuple[int, int],
        prefix: str,
        *,
        mask_prob: float,
        mask_length: int,
        mask_prob_adjust: float,
        copies: int = 1,
    ) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.mask_prob = float(mask_prob)
        self.mask_length = int(mask_length)
        self.mask_prob_adjust = float(mask_prob_adjust)
        self.copies = int(copies)
        num_tokens = self.grid[0] * self.grid[1]
        counts = inverse_block_counts(num_tokens, self.mask_prob, self.mask_length, self.mask_prob_adjust)
        self.visible = counts[1]
        inverse_block_mask(1, self.grid, self.mask_prob, self.mask_length, self.mask_prob_adjust)  # validates
        self.prefix = prefix
        self.mask_key = f"{prefix}_mask"
        self.ids_shuffle_key = f"{prefix}_ids_shuffle"
        self.ids_restore_key = f"{prefix}_ids_restore"
        self.keys = (self.mask_key, self.ids_shuffle_key, self.ids_restore_key)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        mask = inverse_block_mask(
            batch_size * self.copies, self.grid, self.mask_prob, self.mask_length, self.mask_prob_adjust,
            generator,
        )
        ids_shuffle, ids_restore = visible_first_ids(mask)
        return {self.mask_key: mask, self.ids_shuffle_key: ids_shuffle, self.ids_restore_key: ids_restore}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(grid={self.grid}, mask_prob={self.mask_prob}, "
                f"mask_length={self.mask_length}, visible={self.visible}, copies={self.copies})")
