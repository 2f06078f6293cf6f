"""Layer-wise learning-rate decay for fine-tuning (BEiT / MAE `param_groups_lrd`), pure functions.

Layers near the input keep more of what pretraining learnt: parameter group of layer id i gets
lr x decay ** (L + 1 - i), where L is the number of layers. ViTs: id 0 for the patch embedding,
CLS / register tokens and position embedding, i + 1 for `blocks.i`, L + 1 for everything else
(final norm, classifier). CNNs: their stages (timm's `feature_info` modules that own parameters,
e.g. a ResNet's layer1..layer4 = 1..4), 0 for what comes before the first stage (the stem), L + 1
for what comes after (norm, classifier). Weight decay is 0 for 1-D tensors (norms, biases) and
the model's `no_weight_decay()` names (pos_embed, cls_token), as MAE does.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence

from torch import nn

VIT_STEM = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed", "patch_embed")


def under(name: str, prefix: str) -> bool:
    """Whether parameter `name` belongs to module `prefix` ("layer1" holds "layer1.0.conv1.weight")."""
    return name == prefix or name.startswith(prefix + ".")


def vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT's `get_layer_id_for_vit` for a timm ViT parameter name (relative to the timm model)."""
    if any(under(name, stem) for stem in VIT_STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def staged_layer_ids(names: Sequence[str], stages: Sequence[str]) -> dict[str, int]:
    """Layer ids of a network made of stages: stage i (a module prefix) -> i + 1.

    `names` in definition order (as `named_parameters` gives them): a parameter in no stage gets
    0 when it comes before the first staged parameter (the stem), else len(stages) + 1 (the head).
    """
    ids: dict[str, int] = {}
    seen_stage = False
    for name in names:
        stage = next((i for i, prefix in enumerate(stages) if under(name, prefix)), None)
        if stage is not None:
            seen_stage = True
            ids[name] = stage + 1
        else:
            ids[name] = len(stages) + 1 if seen_stage else 0
    return ids


def model_stages(model: nn.Module) -> list[str]:
    """The stage modules of a timm model: its `feature_info` modules that own parameters."""
    info = getattr(model, "feature_info", None)
    if not info:
        raise ValueError(
            f"{type(model).__name__} has no timm feature_info to assign layers from; "
            "set layer_decay=1.0 (no layer-wise decay)"
        )
    modules = dict(model.named_modules())
    names = [entry["module"] for entry in info]
    return [n for n in names if n in modules and any(True for _ in modules[n].parameters())]


def layer_ids(model: nn.Module, is_vit: bool) -> tuple[dict[str, int], int]:
    """({parameter name: layer id}, number of layers L) of a timm model."""
    names = [name for name, _ in model.named_parameters()]
    if is_vit:
        num_layers = len(model.blocks)
        return {name: vit_layer_id(name, num_layers) for name in names}, num_layers
    stages = model_stages(model)
    return staged_layer_ids(names, stages), len(stages)


def lr_scale(layer_id: int, num_layers: int, decay: float) -> float:
    """decay ** (L + 1 - layer_id): 1 for the head, decay ** (L + 1) for the stem."""
    return float(decay) ** (num_layers + 1 - layer_id)


def skips_weight_decay(name: str, ndim: int, no_weight_decay: Collection[str]) -> bool:
    """1-D tensors (norm scales, biases) and the model's no-weight-decay names are not decayed."""
    return ndim <= 1 or name.endswith(".bias") or name in no_weight_decay


def param_groups_lrd(
    named_params: Iterable[tuple[str, nn.Parameter]],
    ids: Mapping[str, int],
    num_layers: int,
    weight_decay: float,
    layer_decay: float,
    no_weight_decay: Collection[str] = (),
) -> list[dict]:
    """Optimizer groups by (layer id, decayed or not), each with its `lr_scale` and `weight_decay`.

    The training loop sets each group's lr to the scheduled lr x `lr_scale`. A parameter missing
    from `ids` is an error: every parameter must have a layer. Frozen parameters are left out.
    Groups also carry `layer_id` and `param_names` (for the result and the tests).
    """
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        if name not in ids:
            raise ValueError(f"parameter {name} has no layer id")
        layer = ids[name]
        plain = skips_weight_decay(name, param.ndim, no_weight_decay)
        group = groups.setdefault((layer, plain), {
            "params": [], "param_names": [], "layer_id": layer,
            "lr_scale": lr_scale(layer, num_layers, layer_decay),
            "weight_decay": 0.0 if plain else float(weight_decay),
        })
        group["params"].append(param)
        group["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]
