"""Per-sample random token masking (MAE), drawn in the data-loading collate step.

MAE's `random_masking`: uniform noise per token, `ids_shuffle = argsort(noise)` (smallest noise is
kept), `ids_restore = argsort(ids_shuffle)` undoes the shuffle, and the binary mask (1 = removed)
is in the original patch order. Drawing it in the DataLoader workers costs the step nothing and
uses the workers' seeded RNG (different per rank and worker, reproducible from the seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def visible_token_count(num_tokens: int, mask_ratio: float) -> int:
    """round(L * (1 - ratio)) tokens stay visible (49 of 196 at 0.75); at least one of each kind."""
    if not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}: set objective.mae.mask_ratio")
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
    """Batch masker: adds `<prefix>_ids_shuffle`, `<prefix>_ids_restore`, `<prefix>_mask` to a batch."""

    def __init__(self, num_tokens: int, mask_ratio: float, prefix: str = "mae") -> None:
        self.num_tokens = int(num_tokens)
        self.mask_ratio = float(mask_ratio)
        self.keep = visible_token_count(self.num_tokens, self.mask_ratio)
        self.prefix = prefix

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        drawn = random_token_mask(batch_size, self.num_tokens, self.mask_ratio, generator)
        return {
            f"{self.prefix}_ids_shuffle": drawn.ids_shuffle,
            f"{self.prefix}_ids_restore": drawn.ids_restore,
            f"{self.prefix}_mask": drawn.mask,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_tokens={self.num_tokens}, mask_ratio={self.mask_ratio})"


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, L, D] gathered along L by ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
