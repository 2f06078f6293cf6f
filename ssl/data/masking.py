"""Per-sample token masks drawn in the data-loading collate step: MAE's random masking and
BEiT / data2vec's block masking.

MAE's `random_masking`: uniform noise per token, `ids_shuffle = argsort(noise)` (smallest noise is
kept), `ids_restore = argsort(ids_shuffle)` undoes the shuffle, and the binary mask (1 = removed)
is in the original patch order. Drawing it in the DataLoader workers costs the step nothing and
uses the workers' seeded RNG (different per rank and worker, reproducible from the seed).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch


def visible_token_count(num_tokens: int, mask_ratio: float) -> int:
    """round(L * (1 - ratio)) tokens stay visible (49 of 196 at 0.75); at least one of each kind."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}: choose a ratio in (0, 1)")
    keep = int(round(num_tokens * (1.0 - mask_ratio)))
    if not 0 < keep < num_tokens:
        raise ValueError(
            f"mask ratio {mask_ratio} on {num_tokens} tokens leaves {keep} visible: need at least one "
            "visible and one masked token (use a smaller patch or another ratio)"
        )
    return keep


@dataclass
class TokenMask:
    """ids_shuffle [B, L] (first `keep` are visible), ids_restore [B, L], mask [B, L] (1 = removed)."""

    ids_shuffle: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor
    keep: int


def random_token_mask(
    batch_size: int, num_tokens: int, mask_ratio: float, generator: torch.Generator | None = None
) -> TokenMask:
    """MAE's per-sample uniform random masking, as index tensors."""
    keep = visible_token_count(num_tokens, mask_ratio)
    noise = torch.rand(batch_size, num_tokens, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch_size, num_tokens)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return TokenMask(ids_shuffle, ids_restore, mask, keep)


class RandomTokenMasker:
    """Batch masker: adds `<prefix>_ids_shuffle`, `<prefix>_ids_restore`, `<prefix>_mask` to a batch.

    `prefix` is the caller's (an objective's name), so two maskers in one batch never collide;
    read the keys back as `ids_shuffle_key`, `ids_restore_key`, `mask_key`.
    """

    def __init__(self, num_tokens: int, mask_ratio: float, prefix: str) -> None:
        self.num_tokens = int(num_tokens)
        self.mask_ratio = float(mask_ratio)
        self.keep = visible_token_count(self.num_tokens, self.mask_ratio)
        self.prefix = prefix
        self.ids_shuffle_key = f"{prefix}_ids_shuffle"
        self.ids_restore_key = f"{prefix}_ids_restore"
        self.mask_key = f"{prefix}_mask"
        self.keys = (self.ids_shuffle_key, self.ids_restore_key, self.mask_key)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        drawn = random_token_mask(batch_size, self.num_tokens, self.mask_ratio, generator)
        return {
            self.ids_shuffle_key: drawn.ids_shuffle,
            self.ids_restore_key: drawn.ids_restore,
            self.mask_key: drawn.mask,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens}, mask_ratio={self.mask_ratio})"


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, D] gathered along L by ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


# BEiT / data2vec 1.0 block masking: on a 14 x 14 grid, 120 patches in blocks of at least 16.
BEIT_GRID_TOKENS = 196
BEIT_MASKED = 120
BEIT_MIN_BLOCK = 16


class BlockMaskGenerator:
    """BEiT's `MaskingGenerator` (used by data2vec 1.0): rectangles until `num_masked` are covered.

    Each block: area ~ U(min_block, remaining), aspect ratio log-uniform in [min_aspect,
    1/min_aspect], h = round(sqrt(area * r)), w = round(sqrt(area / r)), both smaller than the
    grid, placed uniformly; it is kept when it adds between 1 and `remaining` new patches (up to
    10 attempts). The loop stops when nothing could be added, so an image can end *below*
    `num_masked`, and counts differ between images. Randomness comes from torch's generator.
    """

    def __init__(
        self,
        grid: tuple[int, int],
        num_masked: int,
        min_block: int = BEIT_MIN_BLOCK,
        max_block: int | None = None,
        min_aspect: float = 0.3,
    ) -> None:
        self.height, self.width = int(grid[0]), int(grid[1])
        self.num_masked = int(num_masked)
        if not 0 < self.num_masked < self.height * self.width:
            raise ValueError(
                f"num_masked must be between 1 and {self.height * self.width - 1} for a {grid} grid, "
                f"got {num_masked}"
            )
        self.min_block = int(min_block)
        self.max_block = int(max_block) if max_block else self.num_masked
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    @classmethod
    def scaled(cls, grid: tuple[int, int], mask_fraction: float | None = None) -> BlockMaskGenerator:
        """BEiT's 120-of-196 (61%) with blocks of >= 16 patches, scaled to another grid."""
        tokens = grid[0] * grid[1]
        fraction = BEIT_MASKED / BEIT_GRID_TOKENS if mask_fraction is None else mask_fraction
        num_masked = min(max(1, round(tokens * fraction)), tokens - 1)
        min_block = max(1, round(BEIT_MIN_BLOCK * tokens / BEIT_GRID_TOKENS))
        return cls(grid, num_masked, min_block)

    def _add_block(self, mask: torch.Tensor, limit: int, rng: random.Random) -> int:
        for _ in range(10):
            area = rng.uniform(self.min_block, limit)
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= limit:
                    window.fill_(True)
                    return added
        return 0

    def one(self, rng: random.Random) -> torch.Tensor:
        """One mask [h, w] (True = masked)."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, min(self.num_masked - count, self.max_block), rng)
            if added == 0:
                break
            count += added
        return mask

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, h * w] bool masks; a Python RNG seeded from torch's keeps worker seeding in charge."""
        seed = int(torch.randint(0, 2**62, (), generator=generator))
        rng = random.Random(seed)
        return torch.stack([self.one(rng).flatten() for _ in range(batch_size)])


class BlockMasker:
    """Batch masker: `<prefix>_mask` [B * copies, L] bool, `copies` masks per image (data2vec 2.0's
    clone_batch: several masked students share one teacher pass)."""

    def __init__(self, generator: BlockMaskGenerator, prefix: str, copies: int = 1) -> None:
        self.generator = generator
        self.copies = int(copies)
        self.prefix = prefix
        self.mask_key = f"{prefix}_mask"
        self.keys = (self.mask_key,)

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {self.mask_key: self.generator(batch_size * self.copies, generator)}
