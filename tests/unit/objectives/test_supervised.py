"""The supervised objective of mixed pretraining: settings from yaml, one shared pass beside DINO,
unlabelled rows never reaching its loss, and refusals that say what to change."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from synthetic import Squares

from ssl.backbones.factory import build_backbone
from ssl.config import CONFIG_DIR
from ssl.data.datamodule import merge_view_specs
from ssl.data.spec import INDEX, LABEL, VIEWS
from ssl.errors import IncompatibleConfigError
from ssl.losses.supervised import masked_cross_entropy
from ssl.module import SSLModule
from ssl.objectives import build_objective, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.dino import DINO, DINO_CROPS
from ssl.objectives.supervised import Supervised
from ssl.pretrain import check_labels

SIZE, LOCAL, B = 16, 8, 4


def vit():
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": SIZE, "patch_size": 4, "drop_path_rate": 0.0,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}))


def supervised(backbone, **overrides) -> Supervised:
    return Supervised(backbone.embed_dim, **recipe_settings("supervised", num_classes=5, **overrides))


def batch(seed: int = 0, labels: list[int] | None = None) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 3, SIZE, SIZE, generator=g) for _ in range(2)]
    views += [torch.randn(B, 3, LOCAL, LOCAL, generator=g) for _ in range(2)]
    return {VIEWS: views, LABEL: torch.tensor(labels or [1, -1, 4, -1]), INDEX: torch.arange(B)}


def test_from_config_reads_every_setting_from_the_yaml() -> None:
    node = OmegaConf.load(Path(CONFIG_DIR) / "objective" / "supervised.yaml")
    node.num_classes, node.head, node.hidden_dim, node.label_smoothing = 7, "mlp", 16, 0.1
    backbone = vit()
    objective = build_objective("supervised", node, backbone)
    assert objective.num_classes == 7 and objective.label_smoothing == 0.1
    assert [m.out_features for m in objective.head if isinstance(m, torch.nn.Linear)] == [16, 7]
    assert isinstance(supervised(backbone).head, torch.nn.Linear)  # the yaml's default: linear


@pytest.mark.parametrize("overrides,message", [
    ({"num_classes": None}, "set dataset.num_classes"),
    ({"head": "deep"}, "valid: linear, mlp"),
    ({"label_smoothing": 1.0}, r"in \[0, 1\)"),
])
def test_bad_settings_say_what_to_change(overrides: dict, message: str) -> None:
    settings = {**recipe_settings("supervised", num_classes=5), **overrides}
    with pytest.raises(IncompatibleConfigError, match=message):
        Supervised(32, **settings)


def test_beside_dino_it_takes_dinos_crops_alone_one_default_global_crop() -> None:
    backbone = vit()
    dino = DINO(backbone.embed_dim, **recipe_settings("dino", out_dim=16, hidden_dim=16,
                                                        bottleneck_dim=8, local_crops=2))
    merged = merge_view_specs([dino.view_spec(), supervised(backbone).view_spec()])
    assert merged.crop_recipe == DINO_CROPS and (merged.global_crops, merged.local_crops) == (2, 2)
    alone = merge_view_specs([supervised(backbone).view_spec()])
    assert (alone.global_crops, alone.local_crops) == (1, 0) and alone.crop_recipe.name == "multicrop"


def step_calls(module: SSLModule, data: dict) -> tuple[int, torch.Tensor]:
    """Student backbone calls in one training step, and the step's loss."""
    calls = []
    hook = module.backbone.register_forward_hook(lambda *_: calls.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(data, 0)
    hook.remove()
    return len(calls), loss


def test_composite_with_dino_shares_the_student_pass_and_reads_the_first_global_crop() -> None:
    backbone = vit()
    dino = DINO(backbone.embed_dim, **recipe_settings("dino", out_dim=16, hidden_dim=16,
                                                        bottleneck_dim=8, local_crops=2))
    sup = supervised(backbone)
    alone, _ = step_calls(SSLModule(backbone, {"dino": dino}, {"dino": 1.0}, None, batch_size=B), batch())
    both = SSLModule(backbone, {"dino": dino, "supervised": sup}, {"dino": 1.0, "supervised": 1.0},
                     None, batch_size=B)
    together, _ = step_calls(both, batch())
    assert alone == together == 2  # one pass per crop size, shared by both objectives

    data = batch()
    ctx = StepContext()
    dino.loss(data, backbone, both.teacher.module, ctx)
    shared = sup.loss(data, backbone, None, ctx).loss
    assert ctx.forwards.hits >= 1
    own_pass = masked_cross_entropy(sup.head(backbone(data[VIEWS][0])), data[LABEL])
    torch.testing.assert_close(shared, own_pass, rtol=1e-5, atol=1e-5)


def test_unlabelled_rows_never_reach_the_loss() -> None:
    backbone = vit()
    sup = supervised(backbone)
    data = batch(0)
    loss = sup.loss(data, backbone, None, StepContext())
    loss.loss.backward()
    grads = {n: p.grad.clone() for n, p in sup.named_parameters()}
    assert loss.metrics["labelled"].item() == 2

    other = batch(0)
    g = torch.Generator().manual_seed(9)
    for view in other[VIEWS]:
        view[[1, 3]] = 5 * torch.randn(view[[1, 3]].shape, generator=g)  # new unlabelled images
    other[LABEL] = torch.tensor([1, -3, 4, -1])
    sup.zero_grad()
    again = sup.loss(other, backbone, None, StepContext())
    again.loss.backward()
    torch.testing.assert_close(again.loss, loss.loss, rtol=1e-5, atol=1e-6)
    for name, p in sup.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6)


def test_a_batch_without_labels_still_backpropagates_into_the_head() -> None:
    backbone = vit()
    sup = supervised(backbone)
    out = sup.loss(batch(labels=[-1] * B), backbone, None, StepContext())
    assert out.loss.item() == 0.0 and out.metrics["accuracy"].item() == 0.0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in sup.parameters())


def test_pretraining_without_labelled_images_is_refused() -> None:
    cfg = OmegaConf.create({"objective": {"dino": {}, "supervised": {}}, "dataset": {"name": "imagefolder"}})
    with pytest.raises(IncompatibleConfigError, match="supervised needs labelled images"):
        check_labels(cfg, Squares(4))
    check_labels(OmegaConf.create({"objective": {"dino": {}}, "dataset": {"name": "x"}}), Squares(4))
