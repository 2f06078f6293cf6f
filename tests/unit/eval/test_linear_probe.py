"""Linear probes on cached features: the batched grid, config selection, and the CLI on Fashion-MNIST."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from PIL import Image

from ssl.eval.linear_probe import (
    Standardizer,
    fit_linear_classifiers,
    linear_probe,
    split_train_val,
    top1_per_config,
)

FAST = {"epochs": 10, "batch_size": 64}


def clusters(n: int, classes: int, dim: int, spread: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed class centres (the centres do not depend on `seed`)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=generator)
    return centres[labels] + spread * torch.randn(n, dim, generator=generator), labels


def test_separable_features_are_classified_perfectly() -> None:
    train_x, train_y = clusters(600, 5, 16, 0.5, seed=0)
    test_x, test_y = clusters(300, 5, 16, 0.5, seed=1)
    result = linear_probe(train_x * 7 + 3, train_y, test_x * 7 + 3, test_y, **FAST)
    assert result.top1 == 100.0 and result.top5 == 100.0
    assert result.val_top1 == 100.0
    assert (result.train_size, result.val_size, result.test_size) == (600, 60, 300)


def test_random_labels_stay_near_chance_on_test() -> None:
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(1000, 64, generator=generator), torch.randn(1000, 64, generator=generator)
    train_y = torch.randint(0, 10, (1000,), generator=generator)
    test_y = torch.randint(0, 10, (1000,), generator=generator)
    result = linear_probe(train_x, train_y, test_x, test_y, **FAST)
    assert result.top1 < 16.0 and result.top5 < 60.0  # chance: 10% and 50%, std ~1%


def test_chosen_config_is_the_best_on_validation_each_config_trained_alone() -> None:
    train_x, train_y = clusters(400, 4, 12, 3.0, seed=0)
    test_x, test_y = clusters(200, 4, 12, 3.0, seed=1)
    lrs, wds = [1e-3, 1e-2, 1e-1], [0.0, 1e-2]
    result = linear_probe(train_x, train_y, test_x, test_y, lrs=lrs, weight_decays=wds, seed=3, **FAST)
    fit_rows, val_rows = split_train_val(400, 0.1, seed=3)
    grid = [(g["lr"], g["weight_decay"]) for g in result.grid]
    assert grid == [(lr, wd) for lr in lrs for wd in wds]
    for entry in result.grid:
        alone = fit_linear_classifiers(
            train_x[fit_rows], train_y[fit_rows], 4, [entry["lr"]], [entry["weight_decay"]], seed=3, **FAST
        )
        val_top1 = top1_per_config(alone.logits(train_x[val_rows]), train_y[val_rows])
        assert val_top1.item() == pytest.approx(entry["val_top1"])
    best = max(result.grid, key=lambda g: g["val_top1"])
    assert result.val_top1 == best["val_top1"]
    chosen = next(g for g in result.grid if (g["lr"], g["weight_decay"]) == (result.lr, result.weight_decay))
    assert chosen["val_top1"] == best["val_top1"]
    assert len({g["val_top1"] for g in result.grid}) > 1  # the grid is not degenerate


def test_batched_configs_equal_each_config_trained_alone() -> None:
    x, y = clusters(300, 6, 20, 4.0, seed=0)
    lrs, wds = [0.01, 0.1, 0.3, 0.05], [0.0, 1e-3, 1e-2, 0.1]
    batched = fit_linear_classifiers(x, y, 6, lrs, wds, seed=7, **FAST)
    for k, (lr, wd) in enumerate(zip(lrs, wds)):
        alone = fit_linear_classifiers(x, y, 6, [lr], [wd], seed=7, **FAST)
        assert torch.allclose(batched.weight[k], alone.weight[0], rtol=1e-4, atol=1e-5)
        assert torch.allclose(batched.bias[k], alone.bias[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(batched.weight[0], batched.weight[1])  # the configs did differ


def test_probe_is_deterministic_given_a_seed() -> None:
    train_x, train_y = clusters(300, 4, 12, 3.0, seed=0)
    test_x, test_y = clusters(100, 4, 12, 3.0, seed=1)
    runs = [linear_probe(train_x, train_y, test_x, test_y, seed=s, **FAST).to_dict() for s in (0, 0, 1)]
    assert runs[0] == runs[1]
    assert runs[0]["grid"] != runs[2]["grid"]  # another seed: another split and batch order


def test_split_train_val_is_a_seeded_partition() -> None:
    fit, val = split_train_val(50, 0.1, seed=0)
    assert len(val) == 5 and sorted(torch.cat([fit, val]).tolist()) == list(range(50))
    assert torch.equal(val, split_train_val(50, 0.1, seed=0)[1])
    assert not torch.equal(val, split_train_val(50, 0.1, seed=1)[1])
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_val(50, 0.0)


def test_standardizer_uses_fit_statistics_and_leaves_constant_features_unscaled() -> None:
    x = torch.randn(200, 3) * torch.tensor([5.0, 0.1, 0.0]) + torch.tensor([1.0, -2.0, 0.5])
    scaler = Standardizer.fit(x)
    z = scaler(x)
    assert torch.allclose(z[:, :2].mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(z[:, :2].std(0, correction=0), torch.ones(2), atol=1e-4)
    assert scaler.std[2] == 1.0 and scaler(torch.full((1, 3), 0.7))[0, 2].item() == pytest.approx(0.2)


# --------------------------------------------------------------------------------------------
# `python -m ssl.eval.linear` in a subprocess
# --------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "ssl.eval.linear", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_cli_raw_pixel_probe_on_fashion_mnist(tmp_path: Path) -> None:
    output = tmp_path / "linear.json"
    out = run_cli("pixels=true", "dataset=fashion_mnist", "max_train_samples=2000", "max_test_samples=500",
                  "num_workers=0", f"output={output}")  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert "linear probe on fashion_mnist (raw pixels in [0, 1])" in out.stdout and "top-1" in out.stdout
    result = json.loads(output.read_text())
    assert (result["train_size"], result["val_size"], result["test_size"]) == (2000, 200, 500)
    assert result["feature_dim"] == 3 * 28 * 28 and len(result["grid"]) == 22
    assert result["top1"] > 70.0 and result["top5"] > 95.0
    assert result["val_top1"] == max(g["val_top1"] for g in result["grid"])


@pytest.mark.slow
def test_cli_errors_exit_2(tmp_path: Path) -> None:
    out = run_cli(f"checkpoint={tmp_path / 'missing.ckpt'}")
    assert out.returncode == 2 and "ssl.eval.linear: error: checkpoint" in out.stderr
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(flat / f"{i}.png")
    out = run_cli("pixels=true", "dataset=imagefolder", f"dataset.root={flat}", f"dataset.test_root={flat}",
                  "dataset.image_size=8", "num_workers=0")  # fmt: skip
    assert out.returncode == 2 and "ssl.eval.linear: error: the train split" in out.stderr, out.stderr[-2000:]
