"""MAE: masking, patch layout, loss and sin-cos values (methods.md §4.8), and the objective."""

import pytest
import torch
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.backbones.sincos import sincos_2d
from ssl.data.masking import RandomTokenMasker, gather_tokens, random_token_mask, visible_token_count
from ssl.errors import IncompatibleConfigError
from ssl.losses.mae import mae_loss, normalize_patches, patchify, unpatchify
from ssl.module import SSLModule
from ssl.objectives import build_objective, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.mae import MAE

OPTIM = OmegaConf.create({
    "name": "adamw", "lr": 1.5e-4, "scale_lr_with_batch": True, "min_lr": 0.0, "warmup_epochs": 1,
    "weight_decay": 0.05, "weight_decay_end": 0.05, "betas": [0.9, 0.95], "momentum": 0.9,
    "clip_grad": 0.0, "clip_mode": "none",
})


def tiny_vit(img_size: int = 16, patch: int = 4, **kwargs):
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": img_size, "patch_size": patch, "drop_path_rate": 0.0,
        "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2, **kwargs}}))


def official_random_masking(x: torch.Tensor, ratio: float, noise: torch.Tensor):
    """MAE's random_masking, written out independently from its description."""
    n, length, d = x.shape
    keep = int(length * (1 - ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    kept = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    return kept, torch.gather(mask, 1, ids_restore), ids_restore


def test_visible_count_is_rounded_and_validated() -> None:
    assert visible_token_count(196, 0.75) == 49
    assert visible_token_count(49, 0.75) == 12
    assert visible_token_count(49, 0.6) == 20  # round(19.6); int() would give 19
    assert visible_token_count(100, 0.9) == 10  # int(100 * 0.1) is 9 in floating point
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="mask_ratio"):
            visible_token_count(196, bad)
    with pytest.raises(ValueError, match="visible"):
        visible_token_count(4, 0.95)


def test_masking_shapes_counts_and_inverse() -> None:
    drawn = random_token_mask(8, 196, 0.75, torch.Generator().manual_seed(0))
    assert drawn.keep == 49
    assert torch.equal(drawn.mask.sum(1), torch.full((8,), 147.0))
    arange = torch.arange(196).expand(8, -1)
    assert torch.equal(torch.gather(drawn.ids_shuffle, 1, drawn.ids_restore), arange)
    # The mask is 0 exactly at the kept indices.
    kept = torch.zeros(8, 196).scatter_(1, drawn.ids_shuffle[:, :49], 1.0)
    assert torch.equal(kept, 1 - drawn.mask)
    # Per-sample: different rows keep different tokens.
    assert not torch.equal(drawn.ids_shuffle[0, :49].sort().values, drawn.ids_shuffle[1, :49].sort().values)


def test_masking_matches_the_official_procedure_for_the_same_noise() -> None:
    x = torch.randn(4, 196, 6)
    g = torch.Generator().manual_seed(3)
    drawn = random_token_mask(4, 196, 0.75, g)
    noise = torch.rand(4, 196, generator=torch.Generator().manual_seed(3))
    kept, mask, ids_restore = official_random_masking(x, 0.75, noise)
    assert torch.equal(gather_tokens(x, drawn.ids_shuffle[:, :49]), kept)
    assert torch.equal(drawn.mask, mask)
    assert torch.equal(drawn.ids_restore, ids_restore)


def test_unshuffle_puts_each_kept_token_back() -> None:
    drawn = random_token_mask(3, 16, 0.75, torch.Generator().manual_seed(1))
    x = torch.arange(16.0).expand(3, -1).unsqueeze(-1)
    kept = gather_tokens(x, drawn.ids_shuffle[:, :4])
    full = torch.cat([kept, torch.full((3, 12, 1), -1.0)], dim=1)
    restored = gather_tokens(full, drawn.ids_restore)[..., 0]
    visible = drawn.mask == 0
    assert torch.equal(restored[visible], torch.arange(16.0).expand(3, -1)[visible])
    assert bool((restored[~visible] == -1).all())


def test_masker_adds_prefixed_keys() -> None:
    out = RandomTokenMasker(49, 0.75, prefix="mae")(5)
    assert set(out) == {"mae_ids_shuffle", "mae_ids_restore", "mae_mask"}
    assert out["mae_mask"].shape == (5, 49) and out["mae_mask"].sum().item() == 5 * 37


def test_patchify_layout_and_round_trip() -> None:
    x = (torch.arange(48.0) / 47).reshape(1, 3, 4, 4)
    patches = patchify(x, 2)
    expected = torch.tensor([0, .340426, .680851, .021277, .361702, .702128, .085106, .425532,
                             .765957, .106383, .446809, .787234])
    assert torch.allclose(patches[0, 0], expected, atol=1e-6)
    assert patches.shape == (1, 4, 12)
    y = torch.randn(2, 3, 12, 8)
    assert torch.equal(unpatchify(patchify(y, 4), 4, (3, 2)), y)
    with pytest.raises(ValueError, match="does not divide"):
        patchify(torch.zeros(1, 3, 10, 10), 4)


def test_norm_pix_loss_known_values() -> None:
    x = (torch.arange(48.0) / 47).reshape(1, 3, 4, 4)
    target = patchify(x, 2)
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    zero = torch.zeros_like(target)
    assert mae_loss(zero, target, mask, norm_pix=True).item() == pytest.approx(0.9166561, abs=1e-6)
    assert mae_loss(zero, target, mask, norm_pix=False).item() == pytest.approx(0.3332579, abs=1e-6)
    # pred == 0 and non-constant patches: (P - 1) / P because the variance is unbiased.
    big = torch.rand(2, 3, 32, 32)
    t16 = patchify(big, 16)
    ones = torch.ones(2, 4)
    assert mae_loss(torch.zeros_like(t16), t16, ones).item() == pytest.approx(767 / 768, abs=5e-5)  # eps 1e-6
    # The hand computation of the per-patch normalisation.
    patch = target[0, 1]
    hand = (patch - patch.mean()) / torch.sqrt(((patch - patch.mean()) ** 2).sum() / 11 + 1e-6)
    assert torch.allclose(normalize_patches(target)[0, 1], hand, atol=1e-6)


def test_loss_ignores_visible_patches() -> None:
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 12), torch.randn(2, 16, 12)
    mask = random_token_mask(2, 16, 0.75).mask
    base = mae_loss(pred, target, mask)
    corrupted = pred.clone()
    corrupted[mask == 0] = 1e3
    assert mae_loss(corrupted, target, mask).item() == pytest.approx(base.item(), rel=1e-6)
    corrupted[mask == 1] += 1.0
    assert mae_loss(corrupted, target, mask).item() != pytest.approx(base.item(), rel=1e-3)


def test_sincos_known_values() -> None:
    table = sincos_2d(4, (2, 2), prefix_tokens=1)
    expected = torch.tensor([
        [0, 0, 0, 0], [0, 1, 0, 1], [0.841471, 0.540302, 0, 1],
        [0, 1, 0.841471, 0.540302], [0.841471, 0.540302, 0.841471, 0.540302],
    ])
    assert table.shape == (5, 4)
    assert torch.allclose(table, expected, atol=1e-6)
    assert sincos_2d(32, (7, 5)).shape == (35, 32)
    with pytest.raises(ValueError):
        sincos_2d(6, (2, 2))


def test_resnet_is_rejected_with_advice() -> None:
    resnet = build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 28, "patch_size": 4, "drop_path_rate": None, "kwargs": {}}))
    cfg = OmegaConf.load("conf/objective/mae.yaml")
    cfg.image_size = 28
    with pytest.raises(IncompatibleConfigError, match="MAE needs a ViT.*objective=mfm"):
        build_objective("mae", cfg, resnet)


def test_encoder_sees_only_visible_tokens() -> None:
    backbone = tiny_vit()
    mae = MAE(backbone, **recipe_settings(
        "mae", image_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2,
    ))
    lengths = []
    hook = backbone.model.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    batch = {"plain_views": [torch.randn(3, 3, 16, 16)], **RandomTokenMasker(16, 0.75, prefix="mae")(3)}
    out = mae.loss(batch, backbone, None, StepContext())
    hook.remove()
    assert lengths == [1 + 4]  # CLS + round(16 * 0.25) visible tokens, not all 17
    out.loss.backward()
    assert backbone.model.patch_embed.proj.weight.grad is not None
    assert mae.decoder.mask_token.grad is not None
    assert torch.isfinite(out.loss)


def test_official_init_freezes_sincos_positions_and_excludes_them_from_the_optimizer() -> None:
    backbone = tiny_vit()
    mae = MAE(backbone, **recipe_settings(
        "mae", image_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2,
    ))
    module = SSLModule(backbone, {"mae": mae}, {"mae": 1.0}, OPTIM, batch_size=8)
    pos = backbone.model.pos_embed
    assert not pos.requires_grad
    assert torch.allclose(pos[0], sincos_2d(32, (4, 4), prefix_tokens=1))
    optimizer = module.configure_optimizers()
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(pos) not in in_groups
    decayed = {id(p) for g in optimizer.param_groups if g["apply_weight_decay"] for p in g["params"]}
    assert id(mae.decoder.mask_token) in decayed  # 3-D: decayed, as MAE's add_weight_decay
    assert id(backbone.model.cls_token) in decayed
    assert id(mae.decoder.blocks[0].norm1.weight) not in decayed
    assert module.teacher is None
    # Xavier-uniform Linear with zero bias, as MAE's _init_weights.
    qkv = backbone.model.blocks[0].attn.qkv
    bound = (6 / (qkv.weight.shape[0] + qkv.weight.shape[1])) ** 0.5
    assert qkv.weight.abs().max() <= bound and torch.count_nonzero(qkv.bias) == 0


def test_learned_positions_kept_without_official_init() -> None:
    backbone = tiny_vit()
    MAE(backbone, **recipe_settings(
        "mae", image_size=16, official_init=False, decoder_dim=16, decoder_depth=1, decoder_heads=2,
    )).prepare_backbone(backbone)
    assert backbone.model.pos_embed.requires_grad


def test_default_decoder_sizes() -> None:
    small = MAE(tiny_vit(), **recipe_settings("mae", image_size=16))
    assert small.decoder.decoder_dim == 256 and len(small.decoder.blocks) == 4
    big = MAE(tiny_vit(img_size=224, patch=16), **recipe_settings("mae", image_size=224))
    assert big.decoder.decoder_dim == 512 and len(big.decoder.blocks) == 8
    assert big.decoder.blocks[0].attn.num_heads == 16


def test_reconstruction_pastes_prediction_into_masked_patches() -> None:
    backbone = tiny_vit()
    mae = MAE(backbone, **recipe_settings(
        "mae", image_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2,
    ))
    images = torch.randn(2, 3, 16, 16)
    rec = mae.reconstruct(images, backbone)
    assert rec.corrupted.shape == rec.reconstruction.shape == images.shape
    visible = patchify(rec.corrupted, 4).abs().sum(-1) > 0
    assert visible.sum(1).tolist() == [4, 4]
    # Visible patches are the original pixels in both the masked input and the reconstruction.
    orig, recon = patchify(images, 4), patchify(rec.reconstruction, 4)
    assert torch.allclose(recon[visible], orig[visible])
    assert not torch.allclose(recon[~visible], orig[~visible])


@pytest.mark.parametrize("kwargs", [
    {"reg_tokens": 2, "no_embed_class": True},      # registers, positions on patches only
    {"class_token": False, "global_pool": "avg"},   # no CLS at all
])
def test_any_timm_vit_layout_works(kwargs: dict) -> None:
    backbone = tiny_vit(**kwargs)
    mae = MAE(backbone, **recipe_settings(
        "mae", image_size=16, decoder_dim=16, decoder_depth=1, decoder_heads=2,
    ))
    mae.prepare_backbone(backbone)
    n_prefix = backbone.model.num_prefix_tokens
    pos = backbone.model.pos_embed[0]
    assert torch.allclose(pos[-16:], sincos_2d(32, (4, 4)))
    lengths = []
    hook = backbone.model.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    batch = {"plain_views": [torch.randn(2, 3, 16, 16)], **RandomTokenMasker(16, 0.75, prefix="mae")(2)}
    loss = mae.loss(batch, backbone, None, StepContext()).loss
    hook.remove()
    assert lengths == [n_prefix + 4] and torch.isfinite(loss)
    loss.backward()
