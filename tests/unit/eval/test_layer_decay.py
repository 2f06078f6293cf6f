"""Fine-tuning's layer-wise lr decay: parameter groups checked against lr x decay ** (L + 1 - id)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.eval.finetune import FineTuneClassifier, classifier_param_groups
from ssl.eval.layer_decay import layer_ids, staged_layer_ids

DECAY, WEIGHT_DECAY = 0.65, 0.05


def tiny_vit(depth: int = 3):
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
        "kwargs": {"depth": depth, "embed_dim": 32, "num_heads": 2},
    }))


def tiny_resnet():
    return build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 32, "drop_path_rate": None, "small_image_stem": None,
        "kwargs": {"layers": [1, 1, 1, 1]},
    }))


def expected_vit_id(name: str, depth: int) -> int:
    """The formula's layer ids, written out independently of ssl/eval/layer_decay.py."""
    name = name.removeprefix("backbone.model.")
    if name.split(".")[0] in ("patch_embed", "cls_token", "pos_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1  # the final norm and the classifier head


def expected_resnet_id(name: str) -> int:
    """Stem (conv1, bn1) 0, layer<i> i, the head 5."""
    name = name.removeprefix("backbone.model.")
    if name.startswith("layer"):
        return int(name[len("layer")])
    return 5 if name.startswith("head.") else 0


def groups_of(backbone):
    model = FineTuneClassifier(backbone, num_classes=3, pool="avgpool", head_init_std=0.02)
    settings = OmegaConf.create({"weight_decay": WEIGHT_DECAY, "layer_decay": DECAY})
    groups, num_layers = classifier_param_groups(model, settings)
    return model, groups, num_layers


def check_groups(model, groups, num_layers: int, expected_id, no_decay_names: set[str]) -> None:
    """Every parameter in exactly one group, with the formula's lr scale and the right weight decay."""
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none missing
    params = dict(model.named_parameters())
    for group in groups:
        assert len(group["params"]) == len(group["param_names"])
        for name, param in zip(group["param_names"], group["params"]):
            assert params[name] is param
            layer = expected_id(name)
            assert group["layer_id"] == layer, name
            assert group["lr_scale"] == pytest.approx(DECAY ** (num_layers + 1 - layer)), name
            plain = param.ndim == 1 or name.endswith(".bias") or name in no_decay_names
            assert group["weight_decay"] == (0.0 if plain else WEIGHT_DECAY), name


def test_vit_groups_follow_the_formula() -> None:
    depth = 3
    model, groups, num_layers = groups_of(tiny_vit(depth))
    assert num_layers == depth
    no_decay = {"backbone.model.pos_embed", "backbone.model.cls_token"}
    check_groups(model, groups, num_layers, lambda n: expected_vit_id(n, depth), no_decay)
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale["head.weight"] == 1.0 and scale["backbone.model.norm.weight"] == 1.0
    assert scale["backbone.model.blocks.2.mlp.fc1.weight"] == pytest.approx(DECAY)
    assert scale["backbone.model.blocks.0.attn.qkv.weight"] == pytest.approx(DECAY**3)
    assert scale["backbone.model.patch_embed.proj.weight"] == pytest.approx(DECAY**4)
    assert scale["backbone.model.pos_embed"] == scale["backbone.model.cls_token"] == pytest.approx(DECAY**4)
    decay = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    assert decay["backbone.model.pos_embed"] == decay["backbone.model.cls_token"] == 0.0
    assert decay["backbone.model.blocks.1.norm1.weight"] == decay["head.bias"] == 0.0
    assert decay["backbone.model.blocks.1.attn.proj.weight"] == WEIGHT_DECAY


def test_resnet_groups_follow_the_formula() -> None:
    model, groups, num_layers = groups_of(tiny_resnet())
    assert num_layers == 4  # layer1..layer4
    check_groups(model, groups, num_layers, expected_resnet_id, set())
    scale = {name: g["lr_scale"] for g in groups for name in g["param_names"]}
    assert scale["backbone.model.conv1.weight"] == pytest.approx(DECAY**5)
    assert scale["backbone.model.layer4.0.conv2.weight"] == pytest.approx(DECAY)
    assert scale["head.weight"] == 1.0


def test_layer_decay_of_one_is_one_lr() -> None:
    model = FineTuneClassifier(tiny_vit(2), num_classes=2, pool="global", head_init_std=0.02)
    groups, _ = classifier_param_groups(model, OmegaConf.create({"weight_decay": 0.0, "layer_decay": 1.0}))
    assert {g["lr_scale"] for g in groups} == {1.0}


def test_staged_ids_put_the_stem_first_and_the_head_last() -> None:
    names = ["stem.w", "s1.a", "s1.b", "s2.a", "norm.w", "s10.a"]
    ids = staged_layer_ids(names, ["s1", "s2"])
    assert ids == {"stem.w": 0, "s1.a": 1, "s1.b": 1, "s2.a": 2, "norm.w": 3, "s10.a": 3}  # "s10" is not "s1"


def test_a_model_without_stages_says_how_to_go_on() -> None:
    from torch import nn

    with pytest.raises(ValueError, match="layer_decay=1.0"):
        layer_ids(nn.Linear(2, 2), is_vit=False)
