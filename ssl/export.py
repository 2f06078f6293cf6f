"""Backbone weights in and out: safetensors + a JSON that says how to rebuild the timm model.

`python -m ssl.export checkpoint=<run>/checkpoints/last.ckpt [weights=teacher|student] [output=<path>]`

Exported keys are the timm model's own, so `timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=...), **timm_kwargs)` loads them with nothing missing or left
over. A ResNet's small-image stem (3x3/1 conv, no max-pool) is no timm argument: the JSON then
gives the few lines that rebuild it. Lightning checkpoints are read with `weights_only=True`:
nothing in a file can run code.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.convnet import replace_stem_for_small_images
from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import evenly_spaced_images
from ssl.data.datasets import build_dataset

USAGE = (
    "usage: python -m ssl.export checkpoint=<run>/checkpoints/last.ckpt "
    "[weights=teacher|student] [output=<path without suffix, default <run>/backbone>]"
)

# The same lines without this repository (whose package name hides the standard library's `ssl`
# outside the repo root): what `replace_stem_for_small_images` does to a timm ResNet.
STEM_WITHOUT_SSL = (
    "model.conv1 = torch.nn.Conv2d(model.conv1.in_channels, model.conv1.out_channels, 3, 1, 1, bias=False)\n"
    "model.maxpool = torch.nn.Identity()"
)


def to_json_value(value: Any) -> Any:
    """Plain JSON types: config kwargs may hold OmegaConf containers or tuples."""
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if isinstance(value, dict):
        return {str(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(v) for v in value]
    return value


def timm_overlay(weights: str | Path, timm_kwargs: dict) -> dict[str, Any]:
    """`pretrained_cfg_overlay` that makes timm load our file, strictly.

    `num_classes` as the model's: otherwise the registry's 1000 differs from our 0 and timm drops
    the classifier and loads with `strict=False`, so a wrong file would only log missing keys.
    `custom_load=False`: the registry marks augreg ViTs' weights as .npz (their own loader); timm
    1.0.31 clears that flag for a file overlay, older versions may not.
    """
    return {"file": str(weights), "num_classes": timm_kwargs.get("num_classes", 0), "custom_load": False}


def call_args(values: dict[str, Any]) -> str:
    """`k=v, ...` as Python source, for the printed snippet."""
    return ", ".join(f"{k}={v!r}" for k, v in values.items())


def timm_snippet(meta: dict[str, Any], weights: str | Path) -> str:
    """Ready-to-paste Python that loads the export as a plain timm model named `model`."""
    name, kwargs = meta["timm_name"], meta["timm_kwargs"]
    args = call_args(kwargs)
    if not meta.get("small_image_stem"):
        overlay = call_args(timm_overlay(weights, kwargs))
        return (
            "import timm\n"
            f"model = timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=dict({overlay}), "
            f"{args})"
        )
    return (
        "import timm\n"
        "from safetensors.torch import load_file\n"
        "from ssl.backbones.convnet import replace_stem_for_small_images\n"
        f"model = timm.create_model({name!r}, {args})\n"
        "replace_stem_for_small_images(model)  # 3x3/1 conv, no max-pool: not a timm argument\n"
        f"model.load_state_dict(load_file({str(weights)!r}))"
    )


def export_backbone(
    backbone: Backbone, path: str | Path, source: str = "", state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write `<path>.safetensors` and `<path>.json`; returns the safetensors path.

    `state`: the timm model's weights when they are not in `backbone` itself (gathered FSDP shards).
    """
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    weights = path.with_suffix(".safetensors")
    state = state if state is not None else backbone.model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(state, str(weights))
    small_stem = bool(getattr(backbone, "small_image_stem", False))
    meta: dict[str, Any] = {
        "timm_name": backbone.timm_name,
        "timm_kwargs": to_json_value(backbone.timm_kwargs),
        "small_image_stem": small_stem,
        "source": source,
        "weights_file": weights.name,
    }
    meta["load_with_timm"] = timm_snippet(meta, weights.resolve())
    if small_stem:
        meta["note"] = (
            "The small-image stem (3x3 stride-1 conv1, no max-pool) is not expressible as timm kwargs, so "
            "pretrained=True would fail on conv1's shape: build the model, swap the stem, then "
            "load_state_dict. "
            "Without this repository, the swap is:\n" + STEM_WITHOUT_SSL
        )
    else:
        meta["note"] = (
            "model(x) (num_classes=0) gives the backbone's global vector. ViTs: at img_size exactly; "
            "at other sizes timm resamples position embeddings with antialiasing, ssl with DINO's bicubic."
        )
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return weights


def read_export_meta(path: str | Path) -> dict[str, Any]:
    """The JSON written beside exported weights (`<path>.json`)."""
    meta_path = Path(path).with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: exported weights need their JSON beside them")
    return json.loads(meta_path.read_text())


def timm_model_from_export(path: str | Path) -> nn.Module:
    """The export as a plain timm model, built exactly the way its JSON's `load_with_timm` says."""
    path = Path(path).with_suffix(".safetensors")
    meta = read_export_meta(path)
    kwargs = dict(meta["timm_kwargs"])
    if not meta.get("small_image_stem"):
        return timm.create_model(
            meta["timm_name"], pretrained=True, pretrained_cfg_overlay=timm_overlay(path, kwargs), **kwargs
        )
    model = timm.create_model(meta["timm_name"], **kwargs)
    replace_stem_for_small_images(model)
    model.load_state_dict(load_file(str(path)))
    return model


def load_exported_backbone(path: str | Path) -> Backbone:
    """Rebuild and load a backbone written by `export_backbone`."""
    path = Path(path)
    meta = read_export_meta(path)
    kwargs = dict(meta["timm_kwargs"])
    cfg = {
        "name": meta["timm_name"],
        "img_size": kwargs.pop("img_size", 224),
        "patch_size": kwargs.pop("patch_size", 16),
        "drop_path_rate": kwargs.pop("drop_path_rate", None),
        "small_image_stem": False,
        "kwargs": {k: v for k, v in kwargs.items() if k not in ("num_classes", "dynamic_img_size")},
    }
    backbone = build_backbone(OmegaConf.create(cfg))
    if meta.get("small_image_stem"):
        backbone.small_image_stem = replace_stem_for_small_images(backbone.model)
    backbone.model.load_state_dict(load_file(str(path)))
    return backbone


def read_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The resolved run config and the state dict of a checkpoint written by ssl.pretrain."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if config is None:
        raise ValueError(f"{path} has no `config` hyper-parameter: it was not written by ssl.pretrain")
    return config, ckpt["state_dict"]


def load_checkpoint_backbone(path: str | Path, which: str = "teacher") -> tuple[Backbone, dict[str, Any]]:
    """Backbone (teacher's if present and asked for, else student's) from a Lightning checkpoint.

    "teacher" is the first teacher-based objective's (`teacher.module.*`), as in training's
    evaluations; a combination's extra teachers (`teachers.<objective>.module.*`) are not exported.
    """
    config, state = read_checkpoint(path)
    backbone = build_backbone(OmegaConf.create(config["backbone"]))
    prefixes = ["teacher.module.backbone.", "backbone."] if which == "teacher" else ["backbone."]
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            backbone.load_state_dict(sub)
            # Objectives without a teacher (MAE, MFM) only have the student's weights.
            backbone.weights_source = "teacher" if prefix.startswith("teacher.") else "student"
            return backbone, config
    raise ValueError(f"{path} holds no backbone weights (looked for {prefixes})")


def sample_images(config: dict[str, Any], num_images: int = 16) -> tuple[torch.Tensor, str]:
    """Clean test images of the run's dataset (evenly spaced), or random ones when the data is missing.

    Real images matter: random noise can hide differences that only show on natural statistics.
    """
    dataset_cfg = OmegaConf.create(config.get("dataset") or {})
    size = int(dataset_cfg.get("image_size") or config["backbone"].get("img_size") or 224)
    try:
        data = build_dataset(dataset_cfg, "test")
        if len(data) == 0:
            raise ValueError("the test split is empty")
        images, _ = evenly_spaced_images(data, dataset_cfg, num_images, image_size=size)
        return images, f"{len(images)} clean test images of {dataset_cfg.name}"
    except (OSError, ValueError, KeyError, AttributeError) as error:
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(num_images, 3, size, size, generator=generator)
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return images, f"{num_images} random {size}x{size} tensors (no test data: {reason})"


@torch.no_grad()
def compare_with_timm(checkpoint: str | Path, which: str = "teacher", num_images: int = 16) -> dict[str, Any]:
    """Export a checkpoint's backbone, reload it with timm as the JSON says, compare the features.

    The bar for an export: timm's `model(x)` (num_classes=0) equals our backbone's global vector.
    """
    backbone, config = load_checkpoint_backbone(checkpoint, which)
    backbone.eval()
    with tempfile.TemporaryDirectory() as tmp:
        source = f"{backbone.weights_source} backbone of {checkpoint}"
        weights = export_backbone(backbone, Path(tmp) / "backbone", source=source)
        meta = read_export_meta(weights)
        model = timm_model_from_export(weights).eval()
    images, described = sample_images(config, num_images)
    ours, theirs = backbone(images), model(images)
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "shape": list(ours.shape),
        "images": described,
        "weights_source": backbone.weights_source,
        "small_image_stem": meta["small_image_stem"],
        "timm_call": meta["load_with_timm"],
    }


def main(argv: list[str] | None = None) -> None:
    """CLI: export a checkpoint's backbone and print how to load it with timm."""
    args = dict(a.split("=", 1) for a in (sys.argv[1:] if argv is None else argv) if "=" in a)
    which = args.get("weights", "teacher")
    unknown = set(args) - {"checkpoint", "weights", "output"}
    if "checkpoint" not in args or which not in ("teacher", "student") or unknown:
        print(USAGE, file=sys.stderr)
        sys.exit(2)
    checkpoint = Path(args["checkpoint"])
    if not checkpoint.is_file():
        print(f"ssl.export: error: checkpoint {checkpoint} does not exist", file=sys.stderr)
        sys.exit(2)
    try:
        backbone, _ = load_checkpoint_backbone(checkpoint, which)
    except ValueError as error:
        print(f"ssl.export: error: {error}", file=sys.stderr)
        sys.exit(2)
    # The run directory is the checkpoint's grandparent: <run>/checkpoints/last.ckpt.
    output = Path(args["output"]) if "output" in args else checkpoint.resolve().parent.parent / "backbone"
    source = f"{backbone.weights_source} backbone of {checkpoint.resolve()}"
    weights = export_backbone(backbone, output, source=source)
    meta = read_export_meta(weights)
    print(f"exported the {source}")
    print(f"weights: {weights}\nconfig:  {weights.with_suffix('.json')}")
    print("load it with timm:\n\n" + meta["load_with_timm"] + "\n")


if __name__ == "__main__":
    main()
