"""MFM objective: head shapes, stride per backbone, the corruption path and the recipe's defaults."""

import pytest
import torch
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.data.frequency import FrequencyMasker
from ssl.heads.pixel_shuffle import PixelShuffleHead
from ssl.losses.mfm import mfm_loss
from ssl.module import SSLModule
from ssl.objectives import build_objective, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.mfm import MFM

MEAN, STD = [0.286] * 3, [0.353] * 3


def backbone(name: str, size: int = 28, patch: int = 4, **kwargs):
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": name, "img_size": size, "patch_size": patch, "drop_path_rate": None, "kwargs": kwargs}))


def tiny_vit():
    return backbone("vit_tiny_patch16_224", depth=2, embed_dim=32, num_heads=2)


def test_pixel_shuffle_head_shapes_of_the_official_models() -> None:
    vit = PixelShuffleHead(768, 16)
    assert vit.proj.out_channels == 768
    assert vit(torch.zeros(2, 768, 14, 14)).shape == (2, 3, 224, 224)
    resnet = PixelShuffleHead(2048, 32)
    assert resnet.proj.out_channels == 3072
    assert resnet(torch.zeros(2, 2048, 7, 7)).shape == (2, 3, 224, 224)


@pytest.mark.parametrize(("name", "kwargs", "stride", "lowpass"), [
    ("vit_tiny_patch16_224", {"depth": 2, "embed_dim": 32, "num_heads": 2}, 4, 0.5),
    ("resnet18", {}, 8, 0.3),  # small-image stem: stride 8, a 4 x 4 map overhanging 28 px
])
def test_objective_per_backbone(name: str, kwargs: dict, stride: int, lowpass: float) -> None:
    net = backbone(name, **kwargs)
    mfm = MFM(net, **recipe_settings("mfm", image_size=28, mean=MEAN, std=STD))
    assert mfm.stride == stride and mfm.lowpass_prob == lowpass and mfm.radius == 2.0
    images = torch.randn(3, 3, 28, 28)
    batch = {"plain_views": [images], **mfm.batch_maskers()[0](3)}
    out = mfm.loss(batch, net, None, StepContext())
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert mfm.head.proj.weight.grad is not None
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert mfm.predict(net, images).shape == images.shape


def test_resnet50_at_224_uses_stride_32() -> None:
    mfm = MFM(backbone("resnet50", size=224), **recipe_settings("mfm", image_size=224, mean=MEAN, std=STD))
    assert mfm.stride == 32 and mfm.head.proj.out_channels == 3072 and mfm.radius == 16.0


def test_whole_corrupted_image_is_encoded() -> None:
    net = tiny_vit()
    mfm = MFM(net, **recipe_settings("mfm", image_size=28, mean=MEAN, std=STD))
    lengths = []
    hook = net.model.blocks[0].register_forward_hook(lambda m, i, o: lengths.append(o.shape[1]))
    mfm.predict(net, torch.randn(2, 3, 28, 28))
    hook.remove()
    assert lengths == [1 + 49]


def test_corruption_round_trips_pixels_and_runs_in_float32() -> None:
    mfm = MFM(tiny_vit(), **recipe_settings("mfm", image_size=28, mean=MEAN, std=STD))
    pixels = torch.rand(2, 3, 28, 28)
    images = (pixels - mfm.mean) / mfm.std
    all_pass = torch.ones(2, 28, 28)
    assert torch.allclose(mfm.corrupt(images, all_pass), images, atol=1e-4)
    keep = mfm.batch_maskers()[0](2)["mfm_keep"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        corrupted = mfm.corrupt(images.bfloat16(), keep)
    assert corrupted.dtype == torch.float32
    # Clamped to [0, 1] pixels before normalising (the official order).
    back = corrupted * mfm.std + mfm.mean
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    assert not torch.allclose(corrupted, images, atol=1e-2)


def test_loss_is_on_the_removed_frequencies_only() -> None:
    """A perfect low-pass reconstruction of the target gives the loss floor sqrt(1e-12)."""
    target = torch.randn(2, 3, 28, 28)
    keep = FrequencyMasker(28, 2.0, 1.0)(2)["frequency_mask"]  # all low-pass: the high band is removed
    spectrum = torch.fft.fftshift(torch.fft.fft2(target), dim=(-2, -1))
    only_kept = torch.fft.ifft2(torch.fft.ifftshift(spectrum * keep[:, None], dim=(-2, -1))).real
    # Wrong on the kept band, right on the removed band: still the floor.
    pred = target - only_kept + 5.0 * only_kept
    assert mfm_loss(pred, target, keep).item() == pytest.approx(1e-6, rel=0.1)
    assert mfm_loss(torch.zeros_like(target), target, keep).item() > 0.1


def test_recipe_weight_decay_exemptions() -> None:
    net = tiny_vit()
    mfm = MFM(net, **recipe_settings("mfm", image_size=28, mean=MEAN, std=STD))
    optim = OmegaConf.load("conf/optimizer/mfm.yaml")
    module = SSLModule(net, {"mfm": mfm}, {"mfm": 1.0}, optim, batch_size=8)
    groups = module.configure_optimizers().param_groups
    decayed = {id(p) for g in groups if g["apply_weight_decay"] for p in g["params"]}
    assert id(net.model.pos_embed) not in decayed and id(net.model.cls_token) not in decayed
    assert id(net.model.blocks[0].attn.qkv.weight) in decayed
    assert id(mfm.head.proj.weight) in decayed
    # lr / 512 scaling, with min and warm-up lr scaled the same way.
    schedules = module.build_schedules(total_steps=1000, steps_per_epoch=10)  # 200 warm-up steps
    factor = 8 / 512
    assert schedules["lr"][0] == pytest.approx(2.5e-7 * factor)
    peak = schedules["lr"].max()  # timm's cosine is under way when the warm-up ends
    assert 0.99 * 3e-4 * factor < peak < 3e-4 * factor
    assert schedules["lr"][-1] == pytest.approx(2.5e-6 * factor, rel=0.05)


def test_from_config_and_reconstruction() -> None:
    cfg = OmegaConf.load("conf/objective/mfm.yaml")
    cfg.image_size, cfg.mean, cfg.std = 28, MEAN, STD
    cfg.radius, cfg.lowpass_prob, cfg.focal.enabled = 3.0, 0.7, True
    net = tiny_vit()
    mfm = build_objective("mfm", cfg, net)
    assert mfm.radius == 3.0 and mfm.lowpass_prob == 0.7 and mfm.focal is not None
    rec = mfm.reconstruct(torch.randn(4, 3, 28, 28), net)
    assert rec.original.shape == rec.corrupted.shape == rec.reconstruction.shape == (4, 3, 28, 28)
