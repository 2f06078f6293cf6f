"""Kill a pretraining run mid-epoch, restart the same command: it ends where an uninterrupted run ends.

Run A trains 2 epochs x 6 steps uninterrupted. Run B (same config, another run directory, another
worker count) is killed as soon as its step-8 checkpoint (2 batches into epoch 1) is on disk, then
restarted with the same command: it resumes from the newest checkpoint by itself, and its final
weights and optimizer state equal A's exactly (max abs difference 0.0 on CPU).

The real thing (SIGKILL of a command-line run, one process and two DDP ranks) is tested for DINO.
What differs between objectives is the state a checkpoint must carry (masks drawn in the collate
step, decoder noise, label memory, augmentations drawn in the workers); those runs go in this
process, B "killed" by an exception raised once its checkpoint is written, which saves three ~12 s
interpreter start-ups per objective.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT, pretrain_in_process

from ssl.checkpointing.atomic_io import AtomicCheckpointIO
from ssl.checkpointing.metrics_csv import read_rows_up_to
from ssl.checkpointing.resume import config_differences

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]

COMMON = [
    "data.batch_size=16", "trainer.limit_train_batches=6", "trainer.max_epochs=2", "knn.enabled=false",
    "export.enabled=false", "attention_maps.enabled=false", "reconstructions.enabled=false",
    "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
    "checkpoint.every_n_train_steps=2",
]
OBJECTIVES = {
    # DINO: EMA teacher, centre, stochastic depth 0.1 (the global RNG inside the step), multi-crop.
    "dino": ["objective=dino", "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.dino.out_dim=256",
             "objective.dino.hidden_dim=128", "objective.dino.local_crops=2"],
    # data.augment_on=device: the photometric draws travel with the uint8 crops from the workers.
    "dino_device_augment": ["objective=dino", "backbone=vit_t", "+backbone.kwargs.depth=2",
                            "objective.dino.out_dim=256", "objective.dino.hidden_dim=128",
                            "objective.dino.local_crops=2", "data.augment_on=device"],
    # MAE: masks drawn in the collate step.
    "mae": ["objective=mae", "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.mae.decoder_depth=1"],
    # data2vec 2.0: inverse block masks x 2 clones from the collate step, decoder noise tokens from
    # the global RNG inside the step, the linear EMA ramp.
    "data2vec2": ["objective=data2vec2", "backbone=vit_t", "+backbone.kwargs.depth=2",
                  "objective.data2vec2.clone_batch=2", "objective.data2vec2.decoder.layers=2"],
    # CoKe: label memory, centres and duals (objective state outside the optimizer). 16x16 crops:
    # a ResNet-18 step at 28x28 costs ~1 s here, and the image size is not what is tested.
    "coke": ["objective=coke", "backbone=resnet18", "objective.coke.num_clusters=[8,12]",
             "dataset.image_size=16"],
}
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def command(objective: str, run_dir: Path, workers: int) -> list[str]:
    return [sys.executable, "-m", "ssl.pretrain", *OBJECTIVES[objective], *COMMON,
            f"data.num_workers={workers}", f"hydra.run.dir={run_dir}"]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    """Run `cmd` in the background, output to `log`: the uninterrupted reference run goes alongside
    the run that gets killed (most of a short run's wall time is the ~10 s of imports, which two
    processes spend side by side on two cores)."""
    with open(log, "w") as out:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=600) == 0, log.read_text()[-4000:]


def run_until_file_then_kill(cmd: list[str], target: Path, log: Path, timeout: float = 300) -> None:
    """Start `cmd`, poll for `target` (written atomically: complete once it exists), SIGKILL.

    The run gets its own process group and the whole group is killed: a DDP run's other ranks too.
    """
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        try:
            while not target.exists():
                assert proc.poll() is None, log.read_text()[-4000:]
                assert time.monotonic() < deadline, f"no {target.name} after {timeout}s"
                time.sleep(0.01)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def step_of(name: str) -> int:
    match = re.search(r"step(\d+)", name)
    return int(match.group(1)) if match else -1


def tensors(ckpt: dict) -> dict[str, torch.Tensor]:
    """Model weights, buffers (teacher, objective state) and optimizer state, flattened."""
    flat = {f"model/{k}": v for k, v in ckpt["state_dict"].items()}
    for i, opt in enumerate(ckpt["optimizer_states"]):
        for pid, state in opt["state"].items():
            flat.update({f"optim{i}/{pid}/{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return flat


def max_abs_difference(a: dict, b: dict) -> float:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() if ta[k].numel() else 0.0 for k in ta)


def assert_ends_as_uninterrupted(objective: str, a_dir: Path, b_dir: Path, stderr: str, newest: int) -> None:
    resumed = re.search(r"resuming the run in .* \(step (\d+)\)", stderr)
    assert resumed, stderr[-3000:]
    steps_lost = newest - int(resumed.group(1))  # steps before the newest checkpoint done again
    a = torch.load(a_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(b_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    diff = max_abs_difference(a, b)
    print(f"{objective}: resumed at step {resumed.group(1)} (newest checkpoint on disk: step {newest}, "
          f"steps lost {steps_lost}); max abs diff vs uninterrupted {diff}")
    assert a["global_step"] == b["global_step"] == 12
    assert steps_lost == 0
    assert diff == 0.0
    assert not list((b_dir / "checkpoints").glob("*.tmp-*"))


def newest_step(run_dir: Path) -> int:
    return max(step_of(p.name) for p in (run_dir / "checkpoints").glob("*.ckpt"))


def test_sigkill_mid_epoch_then_same_command_ends_bit_identical(tmp_path: Path) -> None:
    """DINO (EMA teacher, centre, stochastic depth from the global RNG, multi-crop); the reference
    with no workers, the killed run with two."""
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    reference = start(command("dino", a_dir, 0), tmp_path / "a.log")
    cmd = command("dino", b_dir, 2)
    run_until_file_then_kill(cmd, b_dir / "checkpoints" / "epoch001-step0000008.ckpt", tmp_path / "b1.log")
    finish(reference, tmp_path / "a.log")
    newest = newest_step(b_dir)
    out = run(cmd)  # the same command: auto-resume
    assert_ends_as_uninterrupted("dino", a_dir, b_dir, out.stderr, newest)


class CrashAfterCheckpoint(BaseException):
    """SIGKILL's stand-in in process: a BaseException, so nothing in the run catches it."""


def crash_once_written(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Every checkpoint save goes through AtomicCheckpointIO; the one that writes `name` raises."""
    save = AtomicCheckpointIO.save_checkpoint

    def save_then_crash(self: AtomicCheckpointIO, checkpoint: dict, path: str, storage_options=None) -> None:
        save(self, checkpoint, path, storage_options)
        if Path(path).name == name:
            raise CrashAfterCheckpoint(path)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save_then_crash)


@pytest.mark.parametrize(
    ("objective", "workers_a", "workers_b"),
    [("dino_device_augment", 2, 0), ("mae", 2, 0), ("data2vec2", 0, 2), ("coke", 0, 0)],
)
def test_run_killed_after_a_mid_epoch_checkpoint_then_rerun_ends_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, objective: str, workers_a: int, workers_b: int
) -> None:
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    overrides = [*OBJECTIVES[objective], *COMMON]
    status, stderr = pretrain_in_process([*overrides, f"data.num_workers={workers_a}"], a_dir)
    assert status == 0, stderr[-3000:]

    b = [*overrides, f"data.num_workers={workers_b}"]
    with monkeypatch.context() as patch:
        crash_once_written(patch, "epoch001-step0000008.ckpt")
        with pytest.raises(CrashAfterCheckpoint):
            pretrain_in_process(b, b_dir)
    newest = newest_step(b_dir)
    status, stderr = pretrain_in_process(b, b_dir)  # the same config, the same run directory
    assert status == 0, stderr[-3000:]
    assert_ends_as_uninterrupted(objective, a_dir, b_dir, stderr, newest)


@pytest.mark.distributed
def test_two_process_ddp_run_killed_mid_epoch_resumes_bit_identical(tmp_path: Path) -> None:
    """2 CPU ranks (gloo): each rank's sampler shard position and RNG states come back."""
    ddp = ["trainer.accelerator=cpu", "trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=8"]
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    reference = start([*command("dino", a_dir, 0), *ddp], tmp_path / "a.log")
    cmd = [*command("dino", b_dir, 0), *ddp]
    run_until_file_then_kill(cmd, b_dir / "checkpoints" / "epoch001-step0000008.ckpt", tmp_path / "b1.log")
    finish(reference, tmp_path / "a.log")
    out = run(cmd)
    assert "(step 8)" in out.stderr or "(step 10)" in out.stderr, out.stderr[-3000:]
    a = torch.load(a_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    b = torch.load(b_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    diff = max_abs_difference(a, b)
    print(f"2-rank DDP dino: max abs diff vs uninterrupted {diff}")
    assert a["global_step"] == b["global_step"] == 12 and len(b["rng_states"]) == 2
    assert diff == 0.0


def test_a_changed_config_in_the_same_run_directory_is_refused_with_the_differences(tmp_path: Path) -> None:
    run_dir = tmp_path / "r"
    base = [*OBJECTIVES["dino"], *COMMON, "data.num_workers=0", "trainer.max_epochs=1",
            "trainer.limit_train_batches=2"]
    status, stderr = pretrain_in_process(base, run_dir)
    assert status == 0, stderr[-3000:]
    before = (run_dir / "config.yaml").read_text()
    status, stderr = pretrain_in_process([*base, "optimizer.lr=0.5"], run_dir)
    assert status == 2
    assert "already holds a run with a different config" in stderr
    assert "optimizer.lr: 0.0005 -> 0.5" in stderr
    assert (run_dir / "config.yaml").read_text() == before


def test_a_resumed_wandb_run_keeps_its_run_id(tmp_path: Path) -> None:
    """Offline wandb: the restarted command logs into the same wandb run (id kept in the run dir)."""
    run_dir = tmp_path / "w"
    cmd = [*command("dino", run_dir, 0), "logger=wandb"]
    run_until_file_then_kill(cmd, run_dir / "checkpoints" / "epoch000-step0000002.ckpt", tmp_path / "w1.log")
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    first = {p.name for p in (run_dir / "wandb").glob("offline-run-*")}
    run(cmd)
    runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert runs and all(name.endswith(f"-{run_id}") for name in runs), (run_id, runs)
    assert first <= set(runs)


def test_config_differences_names_each_changed_leaf_and_ignores_resume() -> None:
    old = {"seed": 0, "resume": None, "optimizer": {"lr": 1.0, "betas": [0.9, 0.95]}, "a": 1}
    new = {"seed": 0, "resume": "x.ckpt", "optimizer": {"lr": 2.0, "betas": [0.9, 0.95]}, "b": 2}
    expected = ["a: 1 -> (absent)", "b: (absent) -> 2", "optimizer.lr: 1.0 -> 2.0"]
    assert config_differences(old, new) == expected
    assert config_differences(old, {**old, "resume": "y"}) == []
    # a setting added since the run started, at its off value (null), is no difference
    added = {**old, "optimizer": {**old["optimizer"], "labelled_per_batch": None}}
    assert config_differences(old, added) == [] and config_differences(added, old) == []
    added["optimizer"]["labelled_per_batch"] = 4
    assert config_differences(old, added) == ["optimizer.labelled_per_batch: (absent) -> 4"]


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "metrics.csv"
    path.write_text("epoch,step,train/loss\n0,1,5.0\n0,2,4.0\n0,3,3.0\n")
    header, rows = read_rows_up_to(path, 2)
    assert header == ["epoch", "step", "train/loss"] and [r["step"] for r in rows] == ["1", "2"]
