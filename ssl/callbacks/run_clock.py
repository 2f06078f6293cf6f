"""How long a run will take, said before anyone waits for it.

At the start: the planned optimizer steps (epochs x steps per epoch, where a resumed run starts).
After a few steps: the measured time per step and the time left for the whole run. On a CPU, a run
that needs more than a few hours says so once and names the preset that gives a result in minutes.
The progress bar shows the run's step out of its total and the time left (`RunClock.postfix`).

Steps are optimizer steps (`trainer.global_step`), so gradient accumulation and `max_steps` count
as Lightning counts them. The time is training steps only: end-of-epoch evaluations come on top.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import pytorch_lightning as pl

QUICK_PRESET = "python -m ssl.pretrain experiment=quickstart"
LONG_CPU_RUN_SECONDS = 3 * 3600.0


def format_duration(seconds: float) -> str:
    """Rounded for a person: `45 s`, `12 min`, `2 h 36 min`, `11 days 3 h`."""
    if not math.isfinite(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min"
    days, hours = divmod(hours, 24)
    return f"{days} days {hours} h"


def seconds_left(seconds_per_step: float, step: int, total: float) -> float:
    """Time for the steps from `step` to `total` at the measured rate (inf for an endless run)."""
    if not math.isfinite(total):
        return math.inf
    return max(0.0, total - step) * seconds_per_step


class RunClock(pl.Callback):
    """Prints the plan at the start and a measured ETA after `warmup + window` steps (rank 0).

    The first `warmup` steps are left out of the measurement: they start the workers and fill
    caches. `long_cpu_run_seconds`: above it, a CPU run says so once and names `QUICK_PRESET`.
    """

    def __init__(self, warmup: int = 3, window: int = 20,
                 long_cpu_run_seconds: float = LONG_CPU_RUN_SECONDS) -> None:
        self.warmup, self.window, self.long_cpu_run_seconds = warmup, window, long_cpu_run_seconds
        self.total: float = math.inf
        self.first_step = 0
        self.started_at: tuple[int, float] | None = None  # (step, time) the measurement starts from
        self.seconds_per_step: float | None = None
        self.reported = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.total = float(trainer.estimated_stepping_batches)
        self.first_step = trainer.global_step
        self.started_at, self.seconds_per_step, self.reported = None, None, False
        if trainer.is_global_zero:
            print(f"ssl.pretrain: {self.plan(trainer)}", file=sys.stderr, flush=True)

    def plan(self, trainer: pl.Trainer) -> str:
        total = "an open-ended number of" if not math.isfinite(self.total) else f"{int(self.total)}"
        per_epoch = trainer.num_training_batches / max(1, trainer.accumulate_grad_batches)
        epochs = trainer.max_epochs
        shape = (f"{epochs} epoch(s) x {per_epoch:.0f} steps = " if trainer.max_steps in (-1, None)
                 and epochs not in (None, -1) and math.isfinite(per_epoch) else "")
        where = f", resuming at step {self.first_step}" if self.first_step else ""
        return f"planned {shape}{total} optimizer steps on {trainer.world_size} device(s){where}"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step, now = trainer.global_step, time.perf_counter()
        done = step - self.first_step
        if self.started_at is None:
            if done >= self.warmup:
                self.started_at = (step, now)
            return
        measured = step - self.started_at[0]
        if measured > 0:
            self.seconds_per_step = (now - self.started_at[1]) / measured
        if not self.reported and measured >= self.window and trainer.is_global_zero:
            self.reported = True
            self.report(trainer, step)

    def report(self, trainer: pl.Trainer, step: int) -> None:
        assert self.seconds_per_step is not None
        left = seconds_left(self.seconds_per_step, step, self.total)
        print(f"ssl.pretrain: {self.seconds_per_step:.3g} s/step measured: about {format_duration(left)} "
              f"left for steps {step}..{self.total:.0f} (training only; end-of-epoch evaluations add "
              "to it)", file=sys.stderr, flush=True)
        on_cpu = trainer.strategy.root_device.type == "cpu"
        if on_cpu and left > self.long_cpu_run_seconds:
            print(f"ssl.pretrain: this run needs about {format_duration(left)} on this CPU. For a result "
                  f"in about 15 minutes: {QUICK_PRESET}", file=sys.stderr, flush=True)

    def postfix(self, step: int) -> dict[str, str]:
        """What the progress bar shows: step of the run's total, and the time left."""
        if not math.isfinite(self.total):
            return {"step": str(step)}
        shown = {"step": f"{step}/{self.total:.0f}"}
        if self.seconds_per_step is not None:
            shown["left"] = format_duration(seconds_left(self.seconds_per_step, step, self.total))
        return shown
