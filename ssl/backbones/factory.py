"""Build a backbone from its config: our short aliases or any timm model name."""

from __future__ import annotations

import difflib
from typing import Any

import timm
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.convnet import ConvNetBackbone, replace_stem_for_small_images
from ssl.backbones.vit import ViTBackbone

SMALL_IMAGE_LIMIT = 64  # below this resolution CNNs get the small-image stem


class UnknownBackboneError(ValueError):
    """The backbone name is not a timm model."""


def is_vit_name(name: str) -> bool:
    """Whether timm builds `name` as a plain VisionTransformer (patch size and grid are ours)."""
    return timm.models.model_entrypoint(name).__module__ == "timm.models.vision_transformer"


def check_backbone_name(name: str) -> None:
    """Fail early, with close matches, when timm does not know `name`."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise UnknownBackboneError(
        f"timm has no model named '{name}'.{hint} Use `backbone=<vit_t|vit_s|vit_b|resnet18|resnet50>` "
        "or `backbone.name=<any name from timm.list_models()>`."
    )


def timm_kwargs_for(cfg: Any) -> dict:
    """The keyword arguments given to `timm.create_model` (also written next to exported weights)."""
    kwargs: dict = {"num_classes": 0, **dict(cfg.get("kwargs") or {})}
    if cfg.get("drop_path_rate") is not None:  # null: the recipe, resolved by ssl.pretrain
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if is_vit_name(cfg.name):
        kwargs.update(img_size=cfg.img_size, patch_size=cfg.patch_size, dynamic_img_size=True)
    return kwargs


def uses_small_image_stem(cfg: Any) -> bool:
    """`backbone.small_image_stem`: true | false | null (below SMALL_IMAGE_LIMIT px)."""
    choice = cfg.get("small_image_stem")
    if choice is None:
        return cfg.img_size < SMALL_IMAGE_LIMIT
    if not isinstance(choice, bool):
        raise ValueError(f"backbone.small_image_stem={choice!r}; valid: true, false, null (by image size)")
    return choice


def build_backbone(cfg: Any) -> Backbone:
    """Create the timm model named by `cfg.name` and wrap it in the shared feature API.

    ViTs take image and patch size from the config (which takes them from the dataset), and
    accept crops of other sizes. CNNs get a small-image stem at low resolution.
    """
    check_backbone_name(cfg.name)
    kwargs = timm_kwargs_for(cfg)
    model: nn.Module = timm.create_model(cfg.name, pretrained=False, **kwargs)
    if is_vit_name(cfg.name):
        if cfg.img_size % cfg.patch_size:
            raise ValueError(
                f"patch size {cfg.patch_size} does not divide image size {cfg.img_size}: "
                "set backbone.patch_size (or dataset.patch_size) to a divisor."
            )
        return ViTBackbone(model, cfg.name, kwargs)
    backbone = ConvNetBackbone(model, cfg.name, kwargs)
    backbone.small_image_stem = uses_small_image_stem(cfg) and replace_stem_for_small_images(model)
    return backbone
