"""Non-finite loss / gradient guard: a NaN injected at a chosen step is skipped, counted, survived;
too many in a row stop the run with advice and the last good checkpoint."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from pytorch_lightning.plugins.precision import MixedPrecision
from test_module import Crops, tiny_module
from torch.utils.data import DataLoader

from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.dino import DINO
from ssl.optim.nonfinite import LIKELY_CAUSES, NonFiniteGuard, NonFiniteLossError, all_finite


def inject_nan_loss(module: SSLModule, steps: set[int]) -> None:
    """Multiply DINO's loss by NaN at the chosen optimizer steps (gradients become NaN too)."""
    dino = module.objectives["dino"]
    original = dino.loss

    def loss(batch, backbone, teacher, ctx):
        out = original(batch, backbone, teacher, ctx)
        if ctx.step in steps:
            out.loss = out.loss * float("nan")
        return out

    dino.loss = loss


def inject_inf_grad(module: SSLModule, steps: set[int]) -> None:
    """A finite loss whose gradient (of one backbone tensor) is inf at the chosen steps."""
    param = module.backbone.model.cls_token
    param.register_hook(lambda g: g * float("inf") if module.global_step in steps else g)


class Snapshots(pl.Callback):
    """Student, teacher, optimizer step counts and DINO centre before / after every step."""

    def __init__(self) -> None:
        self.before: dict[int, dict] = {}
        self.after: dict[int, dict] = {}

    @staticmethod
    def take(trainer: pl.Trainer, module: SSLModule) -> dict:
        optimizer = trainer.optimizers[0]
        steps = [float(s["step"]) for s in optimizer.state.values() if "step" in s]
        return {
            "student": {k: v.detach().clone() for k, v in module.backbone.state_dict().items()},
            "teacher": {k: v.detach().clone() for k, v in module.teacher.state_dict().items()},
            "optim_steps": max(steps, default=0.0),
        }

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.before.setdefault(trainer.global_step, self.take(trainer, module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.after[trainer.global_step - 1] = self.take(trainer, module)


def max_change(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def fit(module: SSLModule, tmp_path: Path, accumulate: int = 1, **kwargs) -> tuple[pl.Trainer, Snapshots]:
    snaps = Snapshots()
    trainer = pl.Trainer(
        max_epochs=1, accumulate_grad_batches=accumulate, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[snaps, *kwargs.pop("callbacks", [])],
        enable_checkpointing=kwargs.pop("enable_checkpointing", False), **kwargs,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(Crops(), batch_size=4))
    return trainer, snaps


def assert_skipped(snaps: Snapshots, step: int) -> None:
    before, after = snaps.before[step], snaps.after[step]
    assert max_change(before["student"], after["student"]) == 0.0
    assert max_change(before["teacher"], after["teacher"]) == 0.0
    assert after["optim_steps"] == before["optim_steps"]


def assert_applied(snaps: Snapshots, step: int) -> None:
    before, after = snaps.before[step], snaps.after[step]
    assert max_change(before["student"], after["student"]) > 0.0
    assert max_change(before["teacher"], after["teacher"]) > 0.0
    assert after["optim_steps"] == before["optim_steps"] + 1


@pytest.mark.parametrize("inject", [inject_nan_loss, inject_inf_grad], ids=["nan_loss", "inf_grad"])
def test_a_nonfinite_step_is_skipped_counted_and_survived(inject, tmp_path: Path) -> None:
    module = tiny_module()
    inject(module, {3})
    trainer, snaps = fit(module, tmp_path)
    assert trainer.global_step == 6  # 24 images / 4: the skipped step still counts as a step
    assert_skipped(snaps, 3)
    for step in (2, 4, 5):
        assert_applied(snaps, step)
    assert module.guard.skipped == 1 and module.guard.consecutive == 0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    logged = trainer.callback_metrics
    assert float(logged["train/nonfinite_skipped"]) == 1.0
    assert float(logged["train/nonfinite_consecutive"]) == 0.0


def test_a_nan_micro_batch_skips_the_whole_accumulated_step(tmp_path: Path) -> None:
    module = tiny_module()
    dino = module.objectives["dino"]
    original, calls = dino.loss, []

    def loss(batch, backbone, teacher, ctx):  # NaN on the 2nd of step 1's two micro-batches
        out = original(batch, backbone, teacher, ctx)
        calls.append(ctx.step)
        if len(calls) == 4:
            out.loss = out.loss * float("nan")
        return out

    dino.loss = loss
    trainer, snaps = fit(module, tmp_path, accumulate=2)
    assert trainer.global_step == 3 and calls == [0, 0, 1, 1, 2, 2]
    assert_skipped(snaps, 1)
    assert_applied(snaps, 2)  # (step 0 has lr 0: warm-up)
    assert module.guard.skipped == 1


def test_consecutive_nonfinite_steps_stop_with_causes_and_last_good_checkpoint(tmp_path: Path) -> None:
    module = tiny_module()
    module.guard.max_consecutive = 3
    inject_nan_loss(module, {3, 4, 5})
    checkpoints = pl.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", every_n_train_steps=1, save_top_k=-1, save_last=True,
        filename="step{step}", auto_insert_metric_name=False,
    )
    with pytest.raises(NonFiniteLossError) as caught:
        fit(module, tmp_path, callbacks=[checkpoints], enable_checkpointing=True)
    message = str(caught.value)
    assert "3 consecutive optimizer steps" in message and "the last at step 5" in message
    for cause in ("learning rate", "warm-up", "bf16-mixed", "teacher temperature", "corrupt"):
        assert cause in message, cause
    # Step 3 evaluated the weights saved after step 2 (step3.ckpt) and failed: step2.ckpt holds
    # the newest weights that trained on; step3.ckpt is not vouched for.
    good = tmp_path / "checkpoints" / "step2.ckpt"
    assert f"Last good checkpoint: {good}" in message and f"resume={good}" in message
    assert good.is_file()
    assert module.guard.skipped == 3


def test_dino_centre_ignores_a_nonfinite_teacher_output() -> None:
    torch.manual_seed(0)
    module = tiny_module()
    dino: DINO = module.objectives["dino"]
    batch = Crops()[0]
    views = [v.unsqueeze(0).repeat(2, 1, 1, 1) for v in batch["views"]]
    teacher = module.teacher.module
    dino.loss({"views": views}, module.backbone, teacher, StepContext())
    centre = dino.center.clone()
    assert centre.abs().sum() > 0  # a finite batch moves it
    corrupt = [v.clone() for v in views]
    corrupt[0][0, 0, 0, 0] = float("nan")  # one pixel of one global crop
    out = dino.loss({"views": corrupt}, module.backbone, teacher, StepContext())
    assert not torch.isfinite(out.loss)
    assert torch.equal(dino.center, centre)


def test_fp16_scaler_overflow_is_counted_apart_and_never_moves_the_teacher(tmp_path: Path) -> None:
    """An inf gradient with a finite loss under GradScaler is the scaler's overflow: it skips the
    step and halves its scale; the guard counts it apart, not towards stopping."""
    module = tiny_module()
    module.guard.max_consecutive = 2
    inject_inf_grad(module, {2, 3, 4})
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=16.0))
    trainer, snaps = fit(module, tmp_path, plugins=[precision])
    for step in (2, 3, 4):
        assert_skipped(snaps, step)
    assert_applied(snaps, 5)
    assert module.guard.overflows == 3 and module.guard.skipped == 0
    assert precision.scaler.get_scale() == 16.0 / 8


def test_guard_counts_and_stops() -> None:
    guard = NonFiniteGuard(max_consecutive=2)
    guard.good("a.ckpt")
    guard.bad(step=5)
    guard.good()  # no newer checkpoint: the last good one stays
    guard.bad(step=7)
    assert (guard.consecutive, guard.skipped, guard.last_good_checkpoint) == (1, 2, "a.ckpt")
    with pytest.raises(NonFiniteLossError, match="2 consecutive .* step 8; 3 skipped in all"):
        guard.bad(step=8)
    never = NonFiniteGuard(max_consecutive=0)
    for step in range(100):
        never.bad(step)
    assert never.skipped == 100
    message = str(pytest.raises(NonFiniteLossError, NonFiniteGuard(1).bad, 0).value)
    assert "Last good checkpoint: none" in message
    assert all(cause in message for cause in LIKELY_CAUSES)


def test_all_finite() -> None:
    assert bool(all_finite([torch.ones(3), None, torch.zeros(2, 2)]))
    assert not bool(all_finite([torch.ones(3), torch.tensor([1.0, math.inf])]))
    assert not bool(all_finite([torch.tensor([math.nan])]))
    assert bool(all_finite([]))


def test_fp16_gradients_are_unscaled_before_clipping(tmp_path: Path, monkeypatch) -> None:
    """The fused AdamW unscales inside its own step, so Lightning leaves the gradients scaled when
    the clipping hook runs; the module unscales them first (else DINO clips grads x 2^10)."""
    import ssl.module

    clip = ssl.module.clip_gradients

    def norms_seen(plugins: list) -> list[float]:
        seen: list[float] = []

        def spy(params, max_norm, mode):
            grad = params[0].grad if params[0].grad is not None else torch.zeros(1)
            seen.append(float(grad.norm()))
            clip(params, max_norm, mode)

        monkeypatch.setattr(ssl.module, "clip_gradients", spy)
        fit(tiny_module(), tmp_path, plugins=plugins, max_steps=2)
        return seen

    fp32 = norms_seen([])
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)  # no real overflow on this model
    fp16 = norms_seen([MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    assert len(fp16) == len(fp32) == 2 and fp32[0] > 0
    assert all(0.5 < a / b < 2.0 for a, b in zip(fp16, fp32)), (fp16, fp32)


def test_coke_clustering_state_ignores_nonfinite_features() -> None:
    from ssl.objectives.coke import CoKe

    torch.manual_seed(0)
    coke = CoKe(32, **recipe_settings("coke", num_samples=8, num_clusters=[3]))
    features = torch.nn.functional.normalize(torch.randn(4, 128), dim=1)
    coke.cluster(features, torch.arange(4), epoch=0)
    state = {k: v.clone() for k, v in coke.state_dict().items()}
    corrupt = features.clone()
    corrupt[1, 0] = float("nan")
    coke.cluster(corrupt, torch.arange(4, 8), epoch=0)
    assert all(torch.equal(state[k], v) for k, v in coke.state_dict().items())
    coke.cluster(features, torch.arange(4, 8), epoch=0)  # a finite batch still updates
    assert not all(torch.equal(state[k], v) for k, v in coke.state_dict().items())


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_a_diverging_run_stops_with_advice_and_its_last_good_checkpoint(tmp_path: Path) -> None:
    """lr 1e30: step 0 (warm-up lr 0) and step 1 train, the weights blow up to ~1e27, steps 2-4
    give NaN losses and are skipped, and the run stops (exit 3) naming the checkpoint written
    before the blow-up, whose weights are still the healthy ones."""
    run_dir = tmp_path / "run"
    args = [
        "backbone=vit_t", "+backbone.kwargs.depth=1", "objective.dino.out_dim=64",
        "objective.dino.hidden_dim=32", "objective.dino.local_crops=1", "data.batch_size=8",
        "data.num_workers=0", "trainer.limit_train_batches=6", "trainer.max_epochs=2",
        "knn.enabled=false", "export.enabled=false", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
        "checkpoint.every_n_train_steps=1",
        "checkpoint.every_n_epochs=null", "optimizer.lr=1e30", "guard.max_consecutive_nonfinite=3",
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=REPO_ROOT, capture_output=True,
                         text=True, timeout=600, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 3, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    good = run_dir / "checkpoints" / "epoch000-step0000001.ckpt"
    assert "3 consecutive optimizer steps had a non-finite loss or gradient (the last at step 4" in out.stderr
    assert f"Last good checkpoint: {good}" in out.stderr and f"resume={good}" in out.stderr
    assert "optimizer.lr" in out.stderr and "bf16-mixed" in out.stderr

    def largest_weight(name: str) -> float:
        ckpt = torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
        return max(float(v.abs().max()) for k, v in ckpt["state_dict"].items() if k.startswith("backbone."))

    assert largest_weight(good.name) < 10 < 1e20 < largest_weight("epoch000-step0000002.ckpt")
    metrics = (run_dir / "logs" / "metrics.csv").read_text()
    assert "train/nonfinite_skipped" in metrics and "train/nonfinite_consecutive" in metrics
