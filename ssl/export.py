"""Backbone weights in and out: safetensors + a JSON that says how to rebuild the timm model.

Exported keys are the timm model's own, so `timm.create_model(name, **kwargs)` followed by
`load_state_dict` loads them (a small-image stem is recorded so our loader can rebuild it).
Lightning checkpoints are read with `weights_only=True`: nothing in a file can run code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ssl.backbones.base import Backbone
from ssl.backbones.convnet import replace_stem_for_small_images
from ssl.backbones.factory import build_backbone


def export_backbone(backbone: Backbone, path: str | Path, source: str = "") -> Path:
    """Write `<path>.safetensors` and `<path>.json`; returns the safetensors path."""
    path = Path(path).with_suffix("")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path.with_suffix(".safetensors")))
    meta = {
        "timm_name": backbone.timm_name,
        "timm_kwargs": backbone.timm_kwargs,
        "small_image_stem": bool(getattr(backbone, "small_image_stem", False)),
        "source": source,
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    return path.with_suffix(".safetensors")


def load_exported_backbone(path: str | Path) -> Backbone:
    """Rebuild and load a backbone written by `export_backbone`."""
    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} is missing: exported weights need their JSON beside them")
    meta = json.loads(meta_path.read_text())
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


def load_checkpoint_backbone(path: str | Path, which: str = "teacher") -> tuple[Backbone, dict[str, Any]]:
    """Backbone (teacher's if present and asked for, else student's) from a Lightning checkpoint."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    config = (ckpt.get("hyper_parameters") or {}).get("config")
    if config is None:
        raise ValueError(f"{path} has no `config` hyper-parameter: it was not written by ssl.pretrain")
    backbone = build_backbone(OmegaConf.create(config["backbone"]))
    state = ckpt["state_dict"]
    prefixes = ["teacher.module.backbone.", "backbone."] if which == "teacher" else ["backbone."]
    for prefix in prefixes:
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if sub:
            backbone.load_state_dict(sub)
            # Objectives without a teacher (MAE, MFM) only have the student's weights.
            backbone.weights_source = "teacher" if prefix.startswith("teacher.") else "student"
            return backbone, config
    raise ValueError(f"{path} holds no backbone weights (looked for {prefixes})")
