"""`ssl.eval.finetune`: fine-tuning adapts the backbone where the frozen features cannot help."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from test_labelled_eval import image_folder

from ssl.backbones.factory import build_backbone
from ssl.config import CONFIG_DIR
from ssl.eval import finetune, linear
from ssl.export import export_backbone

SIZE, PATCH = 16, 4


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: a second thread only adds hand-off cost, and much more when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def texture_image(i: int) -> tuple[Image.Image, int]:
    """Class 1: every 4 px patch carries a faint checkerboard (random polarity); class 0: flat
    patches. Each patch has a random grey level, so brightness says nothing about the class."""
    rng = np.random.default_rng(i)
    label = i % 2
    cells = SIZE // PATCH
    levels = rng.uniform(0.2, 0.8, (cells, cells, 1, 1))
    checker = (np.indices((PATCH, PATCH)).sum(0) % 2) * 2 - 1.0
    signs = rng.choice([-1.0, 1.0], (cells, cells, 1, 1))
    blocks = levels + 0.2 * label * signs * checker
    grey = blocks.transpose(0, 2, 1, 3).reshape(SIZE, SIZE)
    return Image.fromarray((np.repeat(grey[:, :, None], 3, axis=2) * 255).astype(np.uint8)), label


def texture_folder(root: Path, start: int, count: int) -> Path:
    for i in range(start, start + count):
        image, label = texture_image(i)
        (root / f"c{label}").mkdir(parents=True, exist_ok=True)
        image.save(root / f"c{label}" / f"{i}.png")
    return root


def tiny_vit():
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": SIZE, "patch_size": PATCH, "drop_path_rate": None,
        "kwargs": {"depth": 1, "embed_dim": 64, "num_heads": 2},
    }))


def composed(command: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(f"eval/{command}", overrides=overrides)


def folder_overrides(train: Path, test: Path) -> list[str]:
    return ["dataset=imagefolder", f"dataset.root={train}", f"dataset.test_root={test}",
            f"dataset.image_size={SIZE}", f"dataset.patch_size={PATCH}", "num_workers=0", "device=cpu",
            "output=null"]


# The backbone has to adapt; augmentations that would blur the 1 px texture are off.
PLAIN_RECIPE = [
    "finetune.epochs=10", "finetune.warmup_epochs=1", "finetune.batch_size=32", "finetune.base_lr=1e-2",
    "finetune.mixup=0", "finetune.cutmix=0", "finetune.augment.rand_augment=null",
    "finetune.augment.reprob=0",
    "finetune.augment.crop_scale=[1.0,1.0]", "finetune.augment.hflip=0", "finetune.drop_path_rate=0",
]


def test_finetuning_beats_the_frozen_probe_where_the_features_are_blank(tmp_path: Path) -> None:
    """A random ViT whose final norm is zeroed gives every image the same frozen features: the
    probe is at chance. Fine-tuning trains that norm and the blocks beneath it and learns the task."""
    train = texture_folder(tmp_path / "train", 0, 320)
    test = texture_folder(tmp_path / "test", 10_000, 100)
    torch.manual_seed(0)
    backbone = tiny_vit()
    torch.nn.init.zeros_(backbone.model.norm.weight)
    torch.nn.init.zeros_(backbone.model.norm.bias)
    weights = export_backbone(backbone, tmp_path / "blank" / "backbone")
    common = [f"checkpoint={weights}", *folder_overrides(train, test)]
    probe = linear.evaluate(composed("linear", [*common, "cache=false", "probe.epochs=10"]))
    tuned = finetune.evaluate(composed("finetune", [*common, *PLAIN_RECIPE]))
    assert tuned["train_size"] == 320 and tuned["test_size"] == 100 and tuned["steps"] == 100
    assert probe["top1"] <= 60.0  # chance is 50 %
    assert tuned["top1"] >= probe["top1"] + 25.0, (tuned["top1"], probe["top1"])


def test_unknown_pool_lists_the_valid_ones(tmp_path: Path) -> None:
    train, test = image_folder(tmp_path / "train", 2), image_folder(tmp_path / "test", 1)
    cfg = composed("finetune", [*folder_overrides(train, test), "backbone=vit_t", "finetune.pool=cls",
                                "dataset.image_size=8", "dataset.patch_size=4"])
    with pytest.raises(ValueError, match="unknown finetune.pool 'cls'; valid: avgpool, global"):
        finetune.evaluate(cfg)


def test_a_cnn_fine_tunes_with_the_full_recipe_on_a_labelled_subset(tmp_path: Path) -> None:
    """Mixup / cutmix, RandAugment, random erasing, drop path and layer decay over ResNet stages."""
    train, test = image_folder(tmp_path / "train", 6), image_folder(tmp_path / "test", 2)
    cfg = composed("finetune", [
        *folder_overrides(train, test), "dataset.image_size=16", "backbone=resnet18",
        "+backbone.kwargs.layers=[1,1,1,1]", "labelled_per_class=3", "finetune.epochs=1",
        "finetune.batch_size=4",
    ])
    result = finetune.evaluate(cfg)
    assert result["train_size"] == 9 and result["labelled"]["per_class_counts"] == {0: 3, 1: 3, 2: 3}
    assert result["steps"] == 2 and np.isfinite(result["final_train_loss"])  # 9 images, batches of 4
    assert result["num_layers"] == 4 and result["mixup"] and result["test_size"] == 6


@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_rebuilt_backbone_has_drop_path_and_the_same_weights(name: str) -> None:
    torch.manual_seed(0)
    if name == "vit":
        backbone = build_backbone(OmegaConf.create({
            "name": "vit_tiny_patch16_224", "img_size": SIZE, "patch_size": PATCH, "drop_path_rate": None,
            "kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2},
        }))
    else:
        backbone = build_backbone(OmegaConf.create({
            "name": "resnet18", "img_size": SIZE, "drop_path_rate": None, "small_image_stem": None,
            "kwargs": {"layers": [1, 1, 1, 1]},
        }))
    rebuilt = finetune.trainable_backbone(backbone, 0.2)
    rates = [m.drop_prob for m in rebuilt.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.2)  # timm: rising to the rate in the last block
    assert not any(type(m).__name__ == "DropPath" for m in backbone.modules())
    before, after = backbone.state_dict(), rebuilt.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert getattr(rebuilt, "small_image_stem", False) == getattr(backbone, "small_image_stem", False)
    images = torch.randn(2, 3, SIZE, SIZE)
    backbone.eval(), rebuilt.eval()  # drop path is off in eval mode: the same function
    assert torch.allclose(backbone(images), rebuilt(images), atol=1e-5)
