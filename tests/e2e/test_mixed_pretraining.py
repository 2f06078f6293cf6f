"""`objective=[dino,supervised]` on a tiny folder: a labelled class tree plus an unlabelled pool.

One real run records its labelled split and trains 2 epochs with 2 labelled images in every batch;
its newest checkpoints are then removed (as if it had been killed after step 5, mid-epoch), and
the same command resumes it: the split file is read back untouched and the final weights and
optimizer state equal the uninterrupted run's exactly (sampler position included).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT
from PIL import Image
from test_resume_exact import max_abs_difference

pytestmark = pytest.mark.slow


def images(folder: Path, count: int, shade: int) -> None:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(shade)
    for i in range(count):
        pixels = (torch.rand(16, 16, 3, generator=g) * 64 + shade).byte().numpy()
        Image.fromarray(pixels).save(folder / f"{i}.png")


def command(root: Path, run_dir: Path) -> list[str]:
    return [
        sys.executable, "-m", "ssl.pretrain", "objective=[dino,supervised]", "dataset=imagefolder",
        f"dataset.root={root / 'labelled'}", f"dataset.unlabelled_root={root / 'pool'}",
        "dataset.image_size=16", "dataset.local_crop_size=8", "dataset.patch_size=4",
        "dataset.labelled_per_class=2", "data.labelled_per_batch=2", "data.batch_size=8",
        "data.num_workers=0", "backbone=vit_t", "+backbone.kwargs.depth=1", "objective.dino.out_dim=64",
        "objective.dino.hidden_dim=32", "objective.dino.bottleneck_dim=16", "objective.dino.local_crops=2",
        "trainer.max_epochs=2", "checkpoint.every_n_train_steps=1", "checkpoint.keep_last=null",
        "knn.enabled=false", "export.enabled=false", "attention_maps.enabled=false",
        "trainer.enable_model_summary=false", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", f"hydra.run.dir={run_dir}",
    ]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_mixed_run_records_its_split_and_resumes_exactly(tmp_path: Path) -> None:
    for c in range(3):
        images(tmp_path / "labelled" / f"class{c}", 4, 60 * c)
    images(tmp_path / "pool" / "nested", 20, 190)
    run_dir = tmp_path / "run"
    cmd = command(tmp_path, run_dir)
    run(cmd)

    split_file = run_dir / "labelled_split.json"
    split = json.loads(split_file.read_text())
    assert split["labelled_per_class"] == 2 and split["per_class_counts"] == {"0": 2, "1": 2, "2": 2}
    assert all(i < 12 for i in split["indices"])  # the class tree comes first, the pool after it
    metrics = (run_dir / "logs" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    labelled = [float(r.split(",")[header.index("train/supervised/labelled")]) for r in metrics[1:]
                if r.split(",")[header.index("train/supervised/labelled")]]
    assert labelled and set(labelled) == {2.0}  # 2 labelled images in every batch
    # 26 images without a kept label, 6 per batch: 4 steps per epoch.
    uninterrupted = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert uninterrupted["global_step"] == 8

    # As if killed after step 5 (epoch 1, one batch in): the newer checkpoints and the result go.
    shutil.copy(split_file, tmp_path / "split_before.json")
    (run_dir / "result.json").unlink()
    for ckpt in (run_dir / "checkpoints").glob("*.ckpt"):
        if ckpt.name == "last.ckpt" or int(ckpt.stem.split("step")[1]) > 5:
            ckpt.unlink()
    out = run(cmd)
    assert re.search(r"resuming the run in .* \(step 5\)", out.stderr), out.stderr[-3000:]
    assert split_file.read_bytes() == (tmp_path / "split_before.json").read_bytes()
    resumed = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 8
    assert max_abs_difference(uninterrupted, resumed) == 0.0
