"""One feature API over timm models; DINO's position-embedding interpolation; small-image stems."""

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ssl.backbones.factory import UnknownBackboneError, build_backbone
from ssl.backbones.multicrop import encode_crops
from ssl.backbones.vit import interpolate_patch_pos_embed


def cfg(name: str, img: int = 28, patch: int = 4, **kwargs) -> OmegaConf:
    return OmegaConf.create({"name": name, "img_size": img, "patch_size": patch,
                             "drop_path_rate": 0.0, "small_image_stem": None, "kwargs": kwargs})


def test_vit_feature_api_matches_timm_at_native_size() -> None:
    backbone = build_backbone(cfg("vit_tiny_patch16_224", depth=2)).eval()
    x = torch.randn(3, 3, 28, 28)
    feats = backbone.forward_features(x, return_blocks=True)
    assert feats.global_vector.shape == (3, 192)
    assert feats.patch_tokens.shape == (3, 49, 192) and feats.grid == (7, 7)
    assert len(feats.block_outputs) == 2 and feats.block_outputs[0].shape == (3, 49, 192)
    assert torch.allclose(backbone(x), backbone.model(x), atol=1e-6)


def test_vit_accepts_local_crops_of_another_size() -> None:
    backbone = build_backbone(cfg("vit_tiny_patch16_224", depth=1)).eval()
    feats = backbone.forward_features(torch.randn(2, 3, 12, 12))
    assert feats.grid == (3, 3) and feats.global_vector.shape == (2, 192)


def test_pos_embed_interpolation_is_dinos_formula() -> None:
    torch.manual_seed(0)
    n, dim = 14, 8
    pos = torch.randn(1, n * n, dim)
    ours = interpolate_patch_pos_embed(pos, (n, n), (6, 6))
    # The official expression: scale_factor = (w0 + 0.1) / sqrt(N), bicubic, no antialias.
    w0 = h0 = 6 + 0.1
    official = F.interpolate(
        pos.reshape(1, int(math.sqrt(n * n)), int(math.sqrt(n * n)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n * n), h0 / math.sqrt(n * n)), mode="bicubic",
    ).permute(0, 2, 3, 1).reshape(1, -1, dim)
    assert torch.equal(ours, official)
    assert torch.equal(interpolate_patch_pos_embed(pos, (n, n), (n, n)), pos)
    # timm's antialiased resample differs (documented in methods.md 2.1): not bit-identical.
    from timm.layers import resample_abs_pos_embed
    timm_version = resample_abs_pos_embed(pos, (6, 6), (n, n), num_prefix_tokens=0)
    assert not torch.allclose(ours, timm_version, atol=1e-4)


def test_resnet_small_image_stem_and_features() -> None:
    backbone = build_backbone(cfg("resnet18", img=28))
    assert backbone.small_image_stem
    assert backbone.model.conv1.kernel_size == (3, 3) and backbone.model.conv1.stride == (1, 1)
    feats = backbone.forward_features(torch.randn(2, 3, 28, 28))
    assert feats.global_vector.shape == (2, 512) and feats.grid == (4, 4)
    big = build_backbone(cfg("resnet18", img=224))
    assert not big.small_image_stem and big.model.conv1.kernel_size == (7, 7)


def test_any_timm_model_by_name() -> None:
    backbone = build_backbone(cfg("convnext_atto", img=32))
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, backbone.embed_dim)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(UnknownBackboneError, match="vit_small_patch16_224"):
        build_backbone(cfg("vit_small_patch16_244"))


def test_patch_must_divide_image() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        build_backbone(cfg("vit_tiny_patch16_224", img=30, patch=4))


def test_encode_crops_one_pass_per_resolution() -> None:
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x.flatten(1)[:, :2]

    crops = [torch.full((2, 1, 4, 4), float(i)) for i in range(2)]
    crops += [torch.full((2, 1, 2, 2), float(i)) for i in range(2, 5)]
    out = encode_crops(encode, crops)
    assert calls == [(4, 1, 4, 4), (6, 1, 2, 2)]
    assert out[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
