"""Bad configurations fail before training with one message that says what to change, and leave
no run directory behind (issue 8's list; the others are tested beside their features)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FASHION_MNIST_DIR, REPO_ROOT, pretrain_refusal

pytestmark = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs dataset-fashion-mnist")


@pytest.mark.parametrize(("overrides", "message"), [
    (["objective=mae", "backbone=vit_t", "objective.mae.mask_ratio=1.2"], "mask_ratio must be in (0, 1)"),
    (["objective=data2vec", "backbone=vit_t", "objective.data2vec.mask_fraction=0"],
     "mask_fraction must be in (0, 1)"),
    (["objective=data2vec2", "backbone=resnet18"], "data2vec 2.0 needs a ViT backbone"),
    (["objective=mfm", "backbone=resnet18", "objective.mfm.lowpass_prob=1.5"],
     "lowpass_prob is a probability"),
    (["objective=dino", "backbone=vit_t", "dataset.local_crop_size=32"],
     "local_crop_size=32 is larger than the global crop size"),
    (["objective=dino", "backbone=vit_t", "data.batch_size=0"], "data.batch_size=0"),
    (["objective=dino", "backbone=vit_t", "dataset.patch_size=5"], "does not divide"),
    (["objective=coke", "backbone=resnet18", "objective.coke.num_clusters=[70000]"],
     "number of training images (60000)"),
    (["objective=dino", "backbone=resnet18", "trainer.strategy=fsdp"], "use trainer.strategy=ddp"),
    (["objective=[dino,supervised]", "backbone=vit_t", "dataset.labelled_fraction=0.01",
      "data.batch_size=16", "data.labelled_per_batch=20"],
     "data.labelled_per_batch=20 with data.batch_size=16"),
])
def test_bad_config_exits_2_with_advice_and_no_run(
    tmp_path: Path, overrides: list[str], message: str
) -> None:
    status, stderr = pretrain_refusal([*overrides, "knn.enabled=false"], tmp_path / "r")
    assert status == 2, stderr[-3000:]
    assert message in stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_the_command_line_refuses_a_bad_config_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    command = ["ssl.pretrain", "objective=mae", "backbone=vit_t", "objective.mae.mask_ratio=1.2",
               "knn.enabled=false", f"hydra.run.dir={tmp_path}/r"]
    out = subprocess.run(
        [sys.executable, "-m", *command],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "ssl.pretrain: error:" in out.stderr and "mask_ratio must be in (0, 1)" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r").exists() or not (tmp_path / "r" / "config.yaml").exists()


def test_unlabelled_folder_given_to_a_labelled_evaluation_says_so(tmp_path: Path) -> None:
    """Images straight under the root (no class folders) have no labels: k-NN and the linear
    probe refuse them with the split and the purpose named."""
    from omegaconf import OmegaConf
    from PIL import Image

    from ssl.eval.encoder import labelled_splits

    for root in ("train", "test"):
        (tmp_path / root).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / root / f"{i}.png")
    cfg = OmegaConf.create({"name": "imagefolder", "root": str(tmp_path / "train"),
                            "test_root": str(tmp_path / "test")})
    with pytest.raises(ValueError, match="the train split of imagefolder has no labels: k-NN needs them"):
        labelled_splits(cfg, "k-NN")
