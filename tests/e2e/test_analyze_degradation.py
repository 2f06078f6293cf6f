"""`python -m ssl.analyze.degradation` on real Fashion-MNIST images, for every objective."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from hydra import compose, initialize_config_dir

from ssl.analyze.degradation import analyse
from ssl.config import CONFIG_DIR

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"),
]

SMALL = ["analysis.max_samples=120", "analysis.max_train_samples=600", "analysis.linear_epochs=2",
         "analysis.pairs=200", "+backbone.kwargs.depth=1", "num_workers=0", "cache=false"]


def composed(*overrides: str):
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("analyze/degradation", overrides=[*SMALL, *overrides])


@pytest.mark.parametrize("objective,knob", [("mae", "mask_ratio"), ("data2vec", "block_mask_ratio"),
                                            ("mfm", "frequency_radius"), ("dino", "local_crop_scale"),
                                            ("coke", "global_crop_scale")])
def test_every_objective_is_analysed_on_its_own_degradation(objective: str, knob: str) -> None:
    results = analyse(composed(f"objective={objective}", "analysis.strengths=[0.3,0.9]"))
    assert results["knob"] == knob and results["strengths"] == [0.3, 0.9]
    assert [r["reference"].split()[0] for r in results["references"]] == ["raw", "vit_tiny_patch16_224"]
    pixels = results["references"][0]
    assert pixels["bank_size"] == 600 and results["test_size"] == 120
    assert pixels["clean"]["knn_top1"] > 50  # raw pixels classify Fashion-MNIST well
    for row in pixels["rows"]:
        assert 0 <= row["knn_top1"] <= 100 and -1 <= row["cos_clean_degraded"] <= 1
    weak, strong = pixels["rows"]
    assert weak["cos_clean_degraded"] > strong["cos_clean_degraded"] or knob.endswith("crop_scale")


def test_crop_degradation_grows_weaker_with_a_larger_crop() -> None:
    results = analyse(composed("objective=dino", "analysis.strengths=[0.05,1.0]",
                               "analysis.references=[pixels]", "analysis.linear=false"))
    small, whole = results["references"][0]["rows"]
    assert whole["cos_clean_degraded"] > small["cos_clean_degraded"]
    assert whole["knn_top1"] > small["knn_top1"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "ssl.analyze.degradation", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=600, env=env)


def test_command_writes_json_markdown_png_and_logs_to_wandb(tmp_path: Path) -> None:
    out = run(["objective=mae", *SMALL, "analysis.strengths=[0.5,0.75]", "logger=wandb",
               f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "degradation.json").read_text())
    assert results["knob"] == "mask_ratio" and results["default"] == 0.75
    assert len(results["references"]) == 2 and len(results["references"][0]["rows"]) == 2
    table = (tmp_path / "degradation.md").read_text()
    assert "| mask_ratio | knn_top1" in table and "| 0.75 |" in table
    assert (tmp_path / "degradation.png").read_bytes()[:4] == b"\x89PNG"
    assert list((tmp_path / "wandb").glob("offline-run-*")), "logger=wandb logs an offline run"
    assert "mask_ratio on fashion_mnist" in out.stdout


@pytest.mark.parametrize("override,message", [
    ("analysis.knob=rotation", "unknown analysis.knob=rotation for this objective; valid: mask_ratio"),
    ("analysis.strengths=[0.5,1.5]", "outside mask_ratio's range (0, 1)"),
    ("analysis.references=[pixels,imagenet]", "unknown analysis.references ['imagenet']; valid: pixels"),
    ("checkpoint=/nonexistent.ckpt", "checkpoint /nonexistent.ckpt does not exist"),
])
def test_bad_input_fails_at_once_with_the_valid_choices(override: str, message: str) -> None:
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        analyse(composed("objective=mae", override))
    assert message in str(error.value)


def test_the_command_line_exits_2_on_bad_input_and_writes_nothing(tmp_path: Path) -> None:
    out = run(["objective=mae", "analysis.knob=rotation", f"hydra.run.dir={tmp_path}"])
    assert out.returncode == 2, out.stderr[-2000:]
    assert "ssl.analyze.degradation: error: unknown analysis.knob=rotation" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "degradation.json").exists()
