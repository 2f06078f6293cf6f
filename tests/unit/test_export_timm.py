"""Exported backbones load in plain timm (nothing missing, nothing left over) and give our features."""

import json
import runpy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import timm.models._builder as timm_builder
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ssl.backbones.factory import build_backbone
from ssl.export import (
    STEM_WITHOUT_SSL,
    compare_with_timm,
    export_backbone,
    load_exported_backbone,
    main,
    read_export_meta,
    timm_model_from_export,
)
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.dino import DINO

TOLERANCE = 1e-5
OPTIM = OmegaConf.create({
    "name": "adamw", "lr": 5e-4, "scale_lr_with_batch": True, "min_lr": 1e-6, "warmup_epochs": 1,
    "weight_decay": 0.04, "weight_decay_end": 0.4, "betas": [0.9, 0.999], "momentum": 0.9,
    "clip_grad": 3.0, "clip_mode": "per_parameter",
})


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrained=True with a file overlay must read the file, never the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("timm tried to download weights")

    for name in ("load_state_dict_from_hf", "load_state_dict_from_url", "download_cached_file",
                 "load_custom_from_hf"):
        monkeypatch.setattr(timm_builder, name, no_network)


def backbone_cfg(name: str, img: int, patch: int = 4, drop_path_rate: float = 0.0, **kwargs) -> dict:
    return {"name": name, "img_size": img, "patch_size": patch, "drop_path_rate": drop_path_rate,
            "small_image_stem": None, "kwargs": kwargs}


def trained_looking(backbone: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics, so an export that forgot buffers would show in the features."""
    g = torch.Generator().manual_seed(seed)
    for m in backbone.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return backbone.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def run_snippet(code: str) -> nn.Module:
    """Execute the JSON's `load_with_timm` text as a user would paste it."""
    namespace: dict = {}
    exec(code, namespace)  # our own generated text, nothing from outside
    return namespace["model"].eval()


CASES = [
    pytest.param(backbone_cfg("vit_tiny_patch16_224", 28, 4, depth=2), 28, id="vit_tiny_28px"),
    pytest.param(backbone_cfg("resnet18", 224, 16), 224, id="resnet18_224px"),
]


@pytest.mark.parametrize(("cfg", "img"), CASES)
@torch.no_grad()
def test_export_loads_in_timm_with_the_same_features(cfg: dict, img: int, tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = trained_looking(build_backbone(OmegaConf.create(cfg)))
    weights = export_backbone(backbone, tmp_path / "backbone", source="test")
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["timm_name"] == cfg["name"] and meta["timm_kwargs"] == backbone.timm_kwargs
    assert meta["small_image_stem"] is False and meta["source"] == "test"
    assert meta["timm_kwargs"]["num_classes"] == 0

    # Keys are exactly the timm model's: a strict load reports nothing missing or unexpected.
    plain = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    state = load_file(str(weights))
    assert set(state) == set(plain.state_dict())
    result = plain.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    x = torch.randn(4, 3, img, img)
    ours = backbone(x)
    model = timm.create_model(
        meta["timm_name"], pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights), num_classes=0), **meta["timm_kwargs"],
    ).eval()
    assert max_diff(model(x), ours) <= TOLERANCE
    assert max_diff(model.forward_head(model.forward_features(x), pre_logits=True), ours) <= TOLERANCE
    # The shortest overlay works too (timm then loads non-strictly: hence num_classes above).
    short = timm.create_model(meta["timm_name"], pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(weights)), **meta["timm_kwargs"]).eval()
    assert max_diff(short(x), ours) <= TOLERANCE
    # The JSON's ready-to-paste text and our helper build the same model.
    assert max_diff(run_snippet(meta["load_with_timm"])(x), ours) <= TOLERANCE
    assert max_diff(timm_model_from_export(weights).eval()(x), ours) <= TOLERANCE
    # A fresh timm model differs: the features above come from the file.
    assert max_diff(timm.create_model(meta["timm_name"], **meta["timm_kwargs"]).eval()(x), ours) > 1e-3


def test_timm_load_is_strict_with_our_overlay(tmp_path: Path) -> None:
    backbone = build_backbone(OmegaConf.create(backbone_cfg("vit_tiny_patch16_224", 28, 4, depth=1)))
    weights = export_backbone(backbone, tmp_path / "backbone")
    state = load_file(str(weights))
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, str(weights))
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn\.qkv\.weight"):
        timm_model_from_export(weights)


@torch.no_grad()
def test_small_image_stem_resnet_round_trips(tmp_path: Path) -> None:
    torch.manual_seed(0)
    backbone = trained_looking(build_backbone(OmegaConf.create(backbone_cfg("resnet18", 28))))
    assert backbone.small_image_stem
    weights = export_backbone(backbone, tmp_path / "backbone")
    meta = read_export_meta(weights)
    assert meta["small_image_stem"] is True
    assert "replace_stem_for_small_images(model)" in meta["load_with_timm"] and "note" in meta
    x = torch.randn(4, 3, 28, 28)
    ours = backbone(x)
    # timm's own arguments cannot express the stem: its strict load refuses conv1.
    with pytest.raises(RuntimeError, match="conv1"):
        timm.create_model("resnet18", pretrained=True, **meta["timm_kwargs"],
                          pretrained_cfg_overlay=dict(file=str(weights), num_classes=0))
    reloaded = load_exported_backbone(weights).eval()
    assert reloaded.small_image_stem and max_diff(reloaded(x), ours) <= TOLERANCE
    # The documented recipe: create_model, swap the stem, load_state_dict (strict).
    assert max_diff(run_snippet(meta["load_with_timm"])(x), ours) <= TOLERANCE
    assert max_diff(timm_model_from_export(weights).eval()(x), ours) <= TOLERANCE
    # ... and the same without this repository.
    model = timm.create_model(meta["timm_name"], **meta["timm_kwargs"])
    exec(STEM_WITHOUT_SSL, {"model": model, "torch": torch})
    result = model.load_state_dict(load_file(str(weights)), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert max_diff(model.eval()(x), ours) <= TOLERANCE


def write_checkpoint(run_dir: Path, backbone: dict, dataset: dict, teacher: bool) -> tuple[Path, SSLModule]:
    """A checkpoint as Lightning writes it, from a real SSLModule (DINO: with its EMA teacher)."""
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create(backbone))
    objectives = (
        {"dino": DINO(net.embed_dim, **recipe_settings(
            "dino", out_dim=32, hidden_dim=16, bottleneck_dim=8, local_crops=1,
        ))}
        if teacher else {}  # no objective: a student-only checkpoint, as MAE / MFM write
    )
    module = SSLModule(net, objectives, {name: 1.0 for name in objectives}, OPTIM, 4,
                       config={"backbone": backbone, "dataset": dataset})
    trained_looking(module.backbone, seed=1)
    if module.teacher is not None:
        with torch.no_grad():  # a teacher that is an average, not a copy
            for p in module.teacher.parameters():
                p.add_(0.05 * torch.randn_like(p))
    path = run_dir / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 1, "global_step": 6, "pytorch-lightning_version": pl.__version__,
                "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path, module.eval()


VIT_CKPT = backbone_cfg("vit_tiny_patch16_224", 28, 4, drop_path_rate=0.1, depth=1, embed_dim=32, num_heads=2)
FASHION = {"name": "fashion_mnist", "root": None, "download": False, "image_size": 28, "patch_size": 4,
           "mean": [0.286] * 3, "std": [0.353] * 3, "num_classes": 10}


@torch.no_grad()
def test_cli_exports_a_checkpoint_next_to_its_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt, module = write_checkpoint(tmp_path / "run", VIT_CKPT, FASHION, teacher=True)
    main([f"checkpoint={ckpt}"])
    out = capsys.readouterr().out
    weights = tmp_path / "run" / "backbone.safetensors"
    assert weights.is_file() and (tmp_path / "run" / "backbone.json").is_file()
    meta = read_export_meta(weights)
    assert str(weights) in out and meta["load_with_timm"] in out and "timm.create_model(" in out
    assert meta["source"].startswith("teacher backbone of") and meta["timm_kwargs"]["drop_path_rate"] == 0.1
    x = torch.randn(3, 3, 28, 28)
    teacher, student = module.teacher["backbone"](x), module.backbone(x)
    assert max_diff(teacher, student) > 1e-3
    assert max_diff(run_snippet(meta["load_with_timm"])(x), teacher) <= TOLERANCE
    assert max_diff(load_exported_backbone(weights).eval()(x), teacher) <= TOLERANCE

    main([f"checkpoint={ckpt}", "weights=student", f"output={tmp_path / 'out' / 'student'}"])
    meta = read_export_meta(tmp_path / "out" / "student.safetensors")
    assert meta["source"].startswith("student backbone of")
    assert max_diff(run_snippet(meta["load_with_timm"])(x), student) <= TOLERANCE


def test_cli_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for argv in ([], [f"checkpoint={tmp_path / 'missing.ckpt'}"], ["checkpoint=x", "weights=ema"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_compare_with_timm_on_the_runs_test_images(tmp_path: Path) -> None:
    ckpt, _ = write_checkpoint(tmp_path / "run", VIT_CKPT, FASHION, teacher=True)
    result = compare_with_timm(ckpt, num_images=8)
    assert result["max_abs_diff"] <= TOLERANCE and result["shape"] == [8, 32]
    assert result["weights_source"] == "teacher" and "timm.create_model(" in result["timm_call"]
    expected = "clean test images of fashion_mnist" if FASHION_MNIST_DIR.exists() else "random"
    assert expected in result["images"]


def test_export_check_script_with_small_stem_and_missing_data(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    no_data = {**FASHION, "root": str(tmp_path / "nowhere")}
    ckpt, _ = write_checkpoint(tmp_path / "run", backbone_cfg("resnet18", 28), no_data, teacher=False)
    result = compare_with_timm(ckpt, num_images=4)
    assert result["small_image_stem"] and result["weights_source"] == "student"
    assert "random 28x28 tensors" in result["images"] and result["max_abs_diff"] <= TOLERANCE
    script = runpy.run_path(str(REPO_ROOT / "scripts" / "export_check.py"), run_name="export_check")
    script["main"]([str(ckpt)])
    out = capsys.readouterr().out
    assert "max abs difference: " in out and "replace_stem_for_small_images" in out
