"""The training side of the degradation curve: a Hydra multirun grid that resumes, and its collector."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FASHION_MNIST_DIR, REPO_ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
TINY_GRID = [
    "experiment=curve_mae_mask_ratio", "objective.mae.mask_ratio=0.5,0.9", "backbone.kwargs.depth=1",
    "data.batch_size=16", "data.num_workers=0", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
    "knn.enabled=false", "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
    "reconstructions.enabled=false", "attention_maps.enabled=false", "logger=csv",
]


def pretrain_grid(sweep_dir: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ssl.pretrain", "-m", *TINY_GRID, f"hydra.sweep.dir={sweep_dir}"]
    out = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_a_rerun_grid_skips_finished_runs_and_trains_the_unfinished(tmp_path: Path) -> None:
    grid = tmp_path / "grid"
    pretrain_grid(grid)
    runs = sorted(p.name for p in grid.iterdir() if p.is_dir())
    assert runs == ["mask_ratio=0.5", "mask_ratio=0.9"]  # named by strength, not by job number
    finished = grid / "mask_ratio=0.5"
    unfinished = grid / "mask_ratio=0.9"
    result = json.loads((finished / "result.json").read_text())
    assert Path(result["backbone"]).name == "backbone.safetensors"
    last = finished / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    (unfinished / "result.json").unlink()  # as if it had been stopped before the end
    for path in (unfinished / "checkpoints").iterdir():
        path.unlink()

    out = pretrain_grid(grid)
    assert f"{finished} already holds this run, finished" in out.stderr
    assert f"{unfinished} already holds this run" not in out.stderr
    assert last.stat().st_mtime_ns == before  # not trained (nor saved) again
    assert (unfinished / "result.json").is_file() and (unfinished / "checkpoints" / "last.ckpt").is_file()

    curve = subprocess.run(
        [sys.executable, "-m", "ssl.analyze.training_curve", f"grid={grid}", "knob=objective.mae.mask_ratio",
         "max_train_samples=300", "max_test_samples=100", "num_workers=0", "cache=false", "linear=false"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert curve.returncode == 0, curve.stderr[-4000:]
    results = json.loads((grid / "curve.json").read_text())
    assert [row["strength"] for row in results["rows"]] == [0.5, 0.9]
    assert set(results["baselines"]) == {"raw pixels", "vit_tiny_patch16_224 untrained"}
    for scores in [*results["rows"], *results["baselines"].values()]:
        assert 0 <= scores["knn_top1"] <= 100
    assert (grid / "curve.png").stat().st_size > 1000 and "| 0.5 |" in (grid / "curve.md").read_text()


def test_the_collector_names_the_knob_a_grid_does_not_vary(tmp_path: Path) -> None:
    run_dir = tmp_path / "grid" / "0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("objective:\n  mae:\n    mask_ratio: 0.5\n")
    out = subprocess.run(
        [sys.executable, "-m", "ssl.analyze.training_curve", f"grid={tmp_path / 'grid'}",
         "knob=optimizer.lr"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 2 and "has no setting optimizer.lr" in out.stderr
