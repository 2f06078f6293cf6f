"""`checkpoint.keep_last` pruning that spares the checkpoint the non-finite guard calls last good.

When a run diverges, its stop message names the newest checkpoint whose weights still trained
(`NonFiniteGuard.last_good_checkpoint`). With frequent saves (`every_n_train_steps`) and a small
`keep_last`, plain pruning would delete exactly that file before the message points at it.
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


class PrunedCheckpoints(pl.callbacks.ModelCheckpoint):
    """ModelCheckpoint keeping the newest `save_top_k` files by step, and the last good one."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.spared: set[str] = set()

    @staticmethod
    def last_good(trainer: pl.Trainer) -> str | None:
        guard = getattr(trainer.lightning_module, "guard", None)
        return getattr(guard, "last_good_checkpoint", None)

    def _remove_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        protected = self.last_good(trainer)
        for old in sorted(self.spared - {protected}):  # no longer last good: prune as usual now
            self.spared.discard(old)
            if Path(old).exists() and old not in self.best_k_models:
                super()._remove_checkpoint(trainer, old)
        if filepath == protected:
            self.spared.add(filepath)
            return
        super()._remove_checkpoint(trainer, filepath)
