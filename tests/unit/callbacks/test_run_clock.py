"""The run says how long it will take: planned steps at the start, a measured ETA after a few steps,
a CPU run too long for a laptop names the quick preset; the progress bar shows step/total and time left."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ssl.callbacks.progress import LazyProgressBar
from ssl.callbacks.run_clock import QUICK_PRESET, RunClock, format_duration, seconds_left


def test_durations_read_like_a_person_says_them() -> None:
    assert format_duration(45) == "45 s"
    assert format_duration(12 * 60 + 10) == "12 min"
    assert format_duration(2.6 * 3600) == "2 h 36 min"
    assert format_duration(260 * 3600) == "10 days 20 h"
    assert format_duration(math.inf) == "unknown"


def test_time_left_counts_the_steps_still_to_run() -> None:
    assert seconds_left(0.5, 100, 1100) == 500.0
    assert seconds_left(0.5, 1200, 1100) == 0.0
    assert seconds_left(0.5, 0, math.inf) == math.inf


class Regression(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(clock: RunClock, epochs: int = 2, batches: int = 8, accumulate: int = 1) -> pl.Trainer:
    data = TensorDataset(torch.randn(batches * 4, 4), torch.randn(batches * 4, 1))
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
                         accumulate_grad_batches=accumulate)
    trainer.fit(Regression(), DataLoader(data, batch_size=4))
    return trainer


def test_plan_then_measured_eta(capsys: pytest.CaptureFixture) -> None:
    clock = RunClock(warmup=2, window=5)
    fit(clock, epochs=2, batches=8, accumulate=2)
    err = capsys.readouterr().err
    assert "planned 2 epoch(s) x 4 steps = 8 optimizer steps on 1 device(s)" in err
    assert "s/step measured: about" in err and "left for steps 7..8" in err
    assert QUICK_PRESET not in err  # a few seconds is no long CPU run
    assert clock.seconds_per_step is not None and clock.seconds_per_step > 0
    assert clock.postfix(6) == {"step": "6/8", "left": format_duration(2 * clock.seconds_per_step)}


def test_a_long_cpu_run_names_the_quick_preset_once(capsys: pytest.CaptureFixture) -> None:
    fit(RunClock(warmup=1, window=2, long_cpu_run_seconds=0.0), epochs=3, batches=6)
    err = capsys.readouterr().err
    assert err.count(QUICK_PRESET) == 1 and "this run needs about" in err


def test_the_progress_bar_shows_the_run_total() -> None:
    clock = RunClock()
    clock.total = 937.0
    bar = LazyProgressBar(refresh_rate=10, clock=clock)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, callbacks=[bar])
    module = Regression()
    module.progress_metrics = {"loss": 1.5}
    trainer.strategy.connect(module)
    metrics = bar.get_metrics(trainer, module)
    assert metrics["step"] == "0/937" and metrics["loss"] == 1.5 and "left" not in metrics
