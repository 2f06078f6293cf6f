"""CLS attention maps, DINO's thresholded masks, their picture, and the training callback."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from synthetic import Squares

from ssl.backbones.factory import build_backbone
from ssl.callbacks.attention_maps import AttentionMaps, visualised_backbone
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.dino import DINO
from ssl.visualize.attention import cls_attention_maps, has_cls_attention, overlay, threshold_masks

DATASET = OmegaConf.create({"image_size": 16, "mean": [0.5] * 3, "std": [0.25] * 3})


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
        "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 4, **kwargs}})).eval()


def timm_attention(backbone, images: torch.Tensor) -> torch.Tensor:
    """Brute force: timm's own unfused attention matrix of the last block, captured after its softmax."""
    attn = backbone.model.blocks[-1].attn
    captured = []
    handle = attn.attn_drop.register_forward_hook(lambda module, args, out: captured.append(out))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        with torch.no_grad():
            backbone.forward_features(images)
    finally:
        attn.fused_attn = fused
        handle.remove()
    return captured[0]  # [B, heads, N, N]




@pytest.mark.parametrize("kwargs", [{}, {"reg_tokens": 2}, {"qk_norm": True}])
def test_maps_equal_timms_attention_and_sum_to_one(kwargs: dict) -> None:
    backbone = tiny_vit(**kwargs)
    images = torch.randn(3, 3, 16, 16)
    maps = cls_attention_maps(backbone, images)
    assert maps.shape == (3, 4, 4, 4)
    torch.testing.assert_close(maps.sum(dim=(-2, -1)), torch.ones(3, 4))
    full = timm_attention(backbone, images)
    n_prefix = backbone.model.num_prefix_tokens
    expected = full[:, :, 0, n_prefix:]
    expected = expected / expected.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(maps.flatten(-2), expected, atol=1e-5, rtol=0)


def test_non_square_images_give_a_non_square_grid() -> None:
    assert cls_attention_maps(tiny_vit(), torch.randn(2, 3, 16, 24)).shape == (2, 4, 4, 6)


def test_backbones_without_cls_attention_are_refused() -> None:
    resnet = build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 16, "patch_size": 4, "drop_path_rate": None, "kwargs": {}}))
    with pytest.raises(ValueError, match="ViT"):
        cls_attention_maps(resnet, torch.randn(1, 3, 16, 16))
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    assert not has_cls_attention(no_cls) and not has_cls_attention(resnet)
    with pytest.raises(ValueError, match="CLS token"):
        cls_attention_maps(no_cls, torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("keep", [0.1, 0.6, 0.9, 1.0])
def test_masks_hold_the_requested_mass_with_the_fewest_patches(keep: float) -> None:
    torch.manual_seed(1)
    attn = (torch.randn(2, 3, 5, 4) * 2).flatten(-2).softmax(-1).unflatten(-1, (5, 4))
    masks = threshold_masks(attn, keep)
    assert masks.shape == attn.shape and masks.dtype == torch.bool
    for head, mask in zip(attn.flatten(0, 1).flatten(-2), masks.flatten(0, 1).flatten(-2)):
        kept, dropped = head[mask], head[~mask]
        assert kept.sum() >= keep - 1e-6
        assert kept.sum() - kept.min() < keep  # without its smallest patch the mask holds too little
        if len(dropped):
            assert kept.min() >= dropped.max()  # the highest patches


def test_masks_reject_fractions_outside_zero_one() -> None:
    for keep in (0.0, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            threshold_masks(torch.rand(1, 2, 2), keep)


def test_overlay_lays_out_image_heads_and_mask_rows() -> None:
    backbone = tiny_vit()
    pixels = torch.rand(3, 3, 16, 16)
    maps = cls_attention_maps(backbone, pixels)
    picture = overlay(pixels, maps, threshold_masks(maps))
    # 3 columns; rows: image + 4 heads + mask; 16 px enlarged x6 to 96 px with 2 px padding.
    assert picture.size == (3 * 96 + 4 * 2, 6 * 96 + 7 * 2)
    assert overlay(pixels, maps).size == (3 * 96 + 4 * 2, 5 * 96 + 6 * 2)


def test_callback_writes_the_teachers_maps_every_n_epochs(tmp_path) -> None:
    backbone = tiny_vit()
    dino = DINO(32, **recipe_settings("dino", out_dim=16, hidden_dim=8, bottleneck_dim=4))
    module = SSLModule(backbone, {"dino": dino}, {"dino": 1.0}, OmegaConf.load("conf/optimizer/dino.yaml"), 4)
    module.train()
    assert visualised_backbone(module) is module.teacher["backbone"]
    callback = AttentionMaps(Squares(), DATASET, tmp_path / "attention", every_n_epochs=2, num_images=3)
    trainer = SimpleNamespace(current_epoch=0, max_epochs=5, is_global_zero=True, global_step=3, logger=None)
    callback.on_train_epoch_end(trainer, module)
    assert callback.written == []  # epoch 1 of 5, every 2
    trainer.current_epoch, trainer.global_step = 1, 6
    callback.on_train_epoch_end(trainer, module)
    assert callback.written == [tmp_path / "attention" / "epoch001.png"]
    # 3 columns; rows: image + 4 heads + mask.
    assert Image.open(callback.written[0]).size == (3 * 96 + 4 * 2, 6 * 96 + 7 * 2)
    assert module.training  # train mode restored
    trainer.current_epoch, trainer.is_global_zero = 3, False
    callback.on_train_epoch_end(trainer, module)
    assert len(callback.written) == 1  # rank 0 only


def test_callback_skips_backbones_without_cls_attention(tmp_path) -> None:
    no_cls = tiny_vit(class_token=False, global_pool="avg")
    module = SimpleNamespace(backbone=no_cls, training=False, eval=no_cls.eval, train=no_cls.train)
    callback = AttentionMaps(Squares(), DATASET, tmp_path / "attention")
    assert callback.write(module, epoch=0, step=0) is None
    assert not (tmp_path / "attention").exists()
