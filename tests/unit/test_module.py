"""SSLModule: parameter groups, lr scaling, teacher updates once per optimizer step."""

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, Dataset

from ssl.backbones.factory import build_backbone
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.dino import DINO

OPTIM = OmegaConf.create({
    "name": "adamw", "lr": 5e-4, "scale_lr_with_batch": True, "min_lr": 1e-6, "warmup_epochs": 1,
    "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": [0.9, 0.999], "momentum": 0.9,
    "clip_grad": 3.0, "clip_mode": "per_parameter",
})


def tiny_module(batch_size: int = 4) -> SSLModule:
    torch.manual_seed(0)
    backbone = build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "drop_path_rate": 0.1,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}))
    dino = DINO(backbone.embed_dim, **recipe_settings(
        "dino", out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=1,
    ))
    return SSLModule(backbone, {"dino": dino}, {"dino": 1.0}, OPTIM, batch_size)


class Crops(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        views = [torch.randn(3, 16, 16, generator=g), torch.randn(3, 16, 16, generator=g),
                 torch.randn(3, 8, 8, generator=g)]
        return {"views": views, "label": 0, "index": i}


def test_parameter_groups_follow_dino() -> None:
    module = tiny_module()
    optimizer = module.configure_optimizers()
    decayed = {id(p) for g in optimizer.param_groups if g["apply_weight_decay"] for p in g["params"]}
    named = dict(module.named_parameters())
    assert id(named["backbone.model.cls_token"]) in decayed  # 3-D: decayed, as the official code
    assert id(named["backbone.model.pos_embed"]) in decayed
    assert id(named["backbone.model.blocks.0.norm1.weight"]) not in decayed
    assert id(named["backbone.model.blocks.0.attn.qkv.bias"]) not in decayed
    assert id(named["objectives.dino.head.mlp.0.weight"]) in decayed
    teacher_ids = {id(p) for p in module.teacher.parameters()}
    all_ids = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_ids & all_ids
    # norm_last_layer: the frozen g is in no group.
    g = module.objectives.dino.head.last_layer.parametrizations.weight.original0
    assert id(g) not in all_ids


def test_lr_scales_with_global_batch() -> None:
    module = tiny_module(batch_size=64)
    schedules = module.build_schedules(total_steps=100, steps_per_epoch=10)
    assert schedules["lr"][10] == pytest.approx(5e-4 * 64 / 256)
    assert schedules["lr"][0] == 0.0
    assert schedules["weight_decay"][0] == pytest.approx(0.04)
    assert schedules["momentum"][0] == pytest.approx(0.996)


def test_teacher_moves_once_per_optimizer_step_under_accumulation(tmp_path) -> None:
    module = tiny_module()
    calls = []
    original = module.teacher.update

    def spy(student, momentum, skip=None):
        calls.append(momentum)
        original(student, momentum, skip)

    module.teacher.update = spy
    trainer = pl.Trainer(
        max_epochs=1, accumulate_grad_batches=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )
    trainer.fit(module, DataLoader(Crops(), batch_size=4))
    assert trainer.global_step == 2  # 6 batches / 3
    assert len(calls) == 2
    expected = module.schedules["momentum"]
    assert calls == pytest.approx([float(expected[0]), float(expected[1])])
    # The teacher is in train mode only because DINO asks for it; its drop path is off.
    assert all(m.drop_prob == 0.0 for m in module.teacher.modules() if hasattr(m, "drop_prob"))
