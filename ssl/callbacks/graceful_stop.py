"""Ctrl-C ends a run at the next step boundary, with a checkpoint there; a second Ctrl-C exits at once.

Lightning's own handling of KeyboardInterrupt raises it wherever the step happens to be (inside the
backward pass, half-way through an optimizer step) and exits with status 1. Here the first SIGINT
only asks: when the current step has ended, a checkpoint is written at that step (the same point
and state as a periodic checkpoint, so resuming continues exactly there) and `RunInterrupted`
ends `trainer.fit`; ssl.pretrain turns it into one line with the resume command, exit status 130.
DataLoader workers ignore SIGINT (ssl/data/worker_signals.py): the main process shuts them down.

Under DDP every rank gets the terminal's SIGINT, maybe at different steps; the ranks agree (any
rank asked) every `check_every` steps, so all stop, and save collectively, at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Checkpoint, ModelCheckpoint

INTERRUPTED_EXIT_STATUS = 130  # 128 + SIGINT, as a shell reports a process ended by Ctrl-C


class RunInterrupted(Exception):
    """Training stopped on request at `step`, with `checkpoint` written there."""

    def __init__(self, step: int, checkpoint: Path) -> None:
        super().__init__(f"stopped at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class GracefulStop(Checkpoint):
    """The SIGINT handler of a fit. A `Checkpoint` subclass, so Lightning runs its batch-end hook
    after the other callbacks', ModelCheckpoint's included: the saved state is the step's final one."""

    def __init__(self, checkpoint_dir: Path, check_every: int = 50) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.check_every = max(1, int(check_every))
        self.requested = False
        self.owner_pid: int | None = None
        self.previous_handler: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requested = False
        self.owner_pid = os.getpid()
        self.previous_handler = signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self.owner_pid:  # a forked child that inherited the handler: not its call
            return
        if self.requested:
            print("\nssl.pretrain: second Ctrl-C: exiting now, without a checkpoint at this step",
                  file=sys.stderr, flush=True)
            os._exit(INTERRUPTED_EXIT_STATUS)
        self.requested = True
        print("\nssl.pretrain: Ctrl-C: stopping when this step ends, with a checkpoint there "
              "(Ctrl-C again to exit at once)", file=sys.stderr, flush=True)

    def stop_now(self, trainer: pl.Trainer) -> bool:
        if trainer.world_size == 1:
            return self.requested
        if trainer.global_step % self.check_every:
            return False
        return bool(trainer.strategy.reduce_boolean_decision(self.requested, all=False))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.stop_now(trainer):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(str(path))
        raise RunInterrupted(trainer.global_step, path)

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        """Named like the run's periodic checkpoints. Not last.ckpt: ModelCheckpoint, restored
        from a file it did not write, would put its next last.ckpt beside it as last-v1.ckpt."""
        periodic = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if periodic is None:
            return self.checkpoint_dir / "last.ckpt"
        name = periodic.format_checkpoint_name({"epoch": trainer.current_epoch, "step": trainer.global_step})
        return self.checkpoint_dir / Path(name).name

    def restore(self) -> None:
        if self.owner_pid == os.getpid() and self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.restore()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self.restore()
