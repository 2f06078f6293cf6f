"""data2vec 2.0: loss conventions, decoder, FFN-output targets, the visible-only student with clones
sharing one teacher pass, the EMA schedule and recipe (methods.md §3.7, §3.12 tests 2, 3, 4, 7, 8)."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_data2vec2_ddp import build, global_batch

from ssl.backbones.factory import build_backbone
from ssl.backbones.sincos import sincos_2d
from ssl.benchmark import training_step
from ssl.config import CONFIG_DIR
from ssl.data.datamodule import merge_view_specs
from ssl.data.spec import PLAIN_VIEWS
from ssl.errors import IncompatibleConfigError
from ssl.heads.data2vec2_decoder import ConvDecoder2d, decoder_input
from ssl.losses.data2vec import data2vec_targets
from ssl.losses.data2vec2 import cls_loss, masked_token_loss, row_loss
from ssl.module import SSLModule
from ssl.objectives import build_objective, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.data2vec2 import Data2Vec2
from ssl.objectives.dino import DINO
from ssl.objectives.mae import MAE
from ssl.optim.schedules import momentum_schedule
from ssl.sync_detector import SyncDetector
from ssl.teacher import TeacherSpec

Y1 = torch.tensor([[1.0, 2, 3, 4], [2, 0, 0, 2]])[None]
Y2 = torch.tensor([[0.0, 1, 0, 1], [4, 3, 2, 1]])[None]
IMAGE = 16


def tiny_vit(depth: int = 4):
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": IMAGE, "patch_size": 2, "drop_path_rate": 0.0,
        "kwargs": {"depth": depth, "embed_dim": 32, "num_heads": 2}}))  # an 8 x 8 grid


def tiny_d2v2(backbone, **overrides) -> Data2Vec2:
    settings = {"image_size": IMAGE, "clone_batch": 3, "decoder": {"layers": 2}, **overrides}
    objective = Data2Vec2(backbone, **recipe_settings("data2vec2", **settings))
    objective.prepare_backbone(backbone)
    return objective


def batch_for(objective: Data2Vec2, n: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {PLAIN_VIEWS: [torch.randn(n, 3, IMAGE, IMAGE, generator=g)]}
    for masker in objective.batch_maskers():
        batch.update(masker(n, g))
    return batch


def teacher_of(backbone) -> torch.nn.ModuleDict:
    teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(backbone)})
    return teacher.eval().requires_grad_(False)


# ---------------------------------------------------------------- loss conventions (pure)
def test_l2_convention_known_value() -> None:
    """§3.12 test 4: zero prediction against the 2.0 toy targets, sum over D x 1/sqrt(D), mean over tokens."""
    target = data2vec_targets([Y1, Y2], top_k=2, layer_norm="instance", final_layer_norm=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = masked_token_loss(torch.zeros_like(target), target, mask)
    assert loss.item() == pytest.approx(1.9999326, abs=1e-6)


def test_smooth_l1_convention_known_value() -> None:
    """§3.12 test 3, fairseq convention: Smooth-L1 beta 2 against the 1.0 toy targets = 0.4999915."""
    target = data2vec_targets([Y1, Y2], top_k=2, layer_norm="layer", final_layer_norm=True)
    loss = masked_token_loss(torch.zeros_like(target), target, torch.ones(1, 2, dtype=torch.bool), beta=2.0)
    assert loss.item() == pytest.approx(0.4999915, abs=1e-6)


def test_masked_mean_and_cls_sum_follow_fairseq() -> None:
    """fairseq: (sum over masked rows of d2v_loss + cls_loss x M x sum over clones of d2v_loss) / M,
    M = masked tokens; here written out with boolean selection."""
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    cls_pred, cls_target = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    m = mask.sum()
    reg = ((pred[mask] - target[mask]) ** 2 / math.sqrt(8)).sum()
    cls = ((cls_pred - cls_target) ** 2 / math.sqrt(8)).sum() * (0.01 * m)
    expected = (reg + cls) / m
    ours = masked_token_loss(pred, target, mask) + cls_loss(cls_pred, cls_target, 0.01)
    torch.testing.assert_close(ours, expected)
    assert cls_loss(torch.ones(2, 4), torch.zeros(2, 4), 0.01).item() == pytest.approx(0.04)  # 2 rows x 4/2
    torch.testing.assert_close(row_loss(torch.ones(4), torch.zeros(4)), torch.tensor(2.0))


# ---------------------------------------------------------------- decoder
def test_decoder_input_puts_visible_latents_back_and_noise_elsewhere() -> None:
    mask = torch.tensor([[True, False, True, False]])
    ids_restore = torch.argsort(torch.argsort(mask.to(torch.uint8), dim=1, stable=True), dim=1)
    visible = torch.tensor([[[1.0, 1], [3, 3]]])  # tokens 1 and 3
    full = decoder_input(visible, ids_restore, noise_std=0.0)
    assert full.tolist() == [[[0, 0], [1, 1], [0, 0], [3, 3]]]
    torch.manual_seed(0)
    noisy = decoder_input(visible.expand(512, -1, -1), ids_restore.expand(512, -1), noise_std=0.01)
    assert torch.equal(noisy[:, [1, 3]], visible.expand(512, -1, -1))
    assert noisy[:, [0, 2]].std().item() == pytest.approx(0.01, rel=0.05)


def test_conv_decoder_matches_the_official_layer_by_hand() -> None:
    """Decoder2d: per layer grouped conv (same padding) -> LN over channels without affine -> GELU,
    + residual; then Linear. Written out with functional ops."""
    torch.manual_seed(0)
    decoder = ConvDecoder2d(32, 32, layers=2, kernel=3, groups=16)
    tokens = torch.randn(2, 16, 32)
    x = tokens.transpose(1, 2).reshape(2, 32, 4, 4)
    for conv in decoder.convs:
        assert conv.groups == 16 and conv.kernel_size == (3, 3)
        y = F.conv2d(x, conv.weight, conv.bias, padding=1, groups=16)
        y = F.layer_norm(y.permute(0, 2, 3, 1), (32,)).permute(0, 3, 1, 2)
        x = F.gelu(y) + x
    expected = decoder.proj(x.reshape(2, 32, 16).transpose(1, 2))
    torch.testing.assert_close(decoder(tokens, (4, 4)), expected)


def test_official_decoder_defaults_and_even_kernels() -> None:
    settings = recipe_settings("data2vec2", image_size=224)
    assert settings["decoder"] == {"dim": None, "layers": 6, "kernel": 3, "groups": 16}
    decoder = ConvDecoder2d(32, 16, layers=2, kernel=4, groups=16)  # width change: no residual
    assert decoder(torch.randn(1, 9, 32), (3, 3)).shape == (1, 9, 32)
    with pytest.raises(ValueError, match="groups"):
        ConvDecoder2d(24, 24, 1, 3, 16)


# ---------------------------------------------------------------- teacher targets
def test_ffn_outputs_are_the_mlp_branch_before_the_residual() -> None:
    vit = tiny_vit(depth=3)
    captured = []
    hooks = [b.mlp.register_forward_hook(lambda m, i, o: captured.append(o)) for b in vit.model.blocks]
    tokens, _ = vit.patch_embed(torch.randn(2, 3, IMAGE, IMAGE))
    tokens = vit.add_prefix(tokens)
    ffn = vit.block_ffn_outputs(tokens)
    for h in hooks:
        h.remove()
    assert len(ffn) == 3
    for ours, hooked in zip(ffn, captured):
        torch.testing.assert_close(ours, hooked[:, 1:])  # CLS removed
    _, blocks = vit.run_blocks(tokens, return_blocks=True)
    assert not torch.allclose(ffn[-1], blocks[-1])  # not the end-of-block output


def test_targets_average_instance_normed_top_blocks_after_the_two_prenet_blocks() -> None:
    vit = tiny_vit(depth=4)
    objective = tiny_d2v2(vit)
    assert objective.top_k == 2  # 4 blocks - 2 prenet
    assert tiny_d2v2(tiny_vit(depth=12)).top_k == 10  # ViT-B: average_top_k_layers 10
    images = torch.randn(2, 3, IMAGE, IMAGE)
    tokens, _ = vit.patch_embed(images)
    ffn = vit.block_ffn_outputs(vit.add_prefix(tokens))
    layers = [F.instance_norm(y.transpose(1, 2)).transpose(1, 2) for y in ffn[-2:]]
    expected = F.layer_norm((layers[0] + layers[1]) / 2, (32,))
    torch.testing.assert_close(objective.teacher_targets(vit, images), expected)


# ---------------------------------------------------------------- the student and one teacher pass
def test_student_encodes_visible_tokens_only_and_the_teacher_runs_once_per_image() -> None:
    vit = tiny_vit()
    objective = tiny_d2v2(vit)
    teacher = teacher_of(vit)
    batch = batch_for(objective, n=2)
    seen = {"student": [], "teacher": []}
    vit.model.blocks[0].register_forward_hook(lambda m, i, o: seen["student"].append(i[0].shape))
    first = teacher["backbone"].model.blocks[0].norm1  # the teacher runs the block's parts one by one
    first.register_forward_hook(lambda m, i, o: seen["teacher"].append(i[0]))
    out = objective.loss(batch, vit, teacher, StepContext())
    # 64 tokens, 80% masked: int(64 * 0.2) = 12 visible + CLS, for 2 images x 3 clones
    assert objective.visible == 12 and seen["student"] == [torch.Size([6, 13, 32])]
    assert len(seen["teacher"]) == 1 and seen["teacher"][0].shape == (2, 65, 32)  # unmasked, once
    assert not seen["teacher"][0].requires_grad
    assert set(out.metrics) == {"regression", "cls", "target_std", "pred_std"}
    out.loss.backward()
    assert vit.model.pos_embed.grad is None and not vit.model.pos_embed.requires_grad  # fixed sin-cos
    assert all(p.grad is not None for p in objective.decoder.parameters())
    assert vit.model.cls_token.grad is not None and vit.model.blocks[0].attn.qkv.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_visible_tokens_are_each_clones_own_and_the_loss_is_the_official_one() -> None:
    """Recompute the loss by hand from the batch: clone c of image i encodes the tokens its own
    mask leaves visible, regresses the image's targets at its masked positions, and its CLS the
    image's mean target."""
    vit = tiny_vit()
    objective = tiny_d2v2(vit, mask_noise_std=0.0)
    teacher = teacher_of(vit)
    batch = batch_for(objective, n=2, seed=3)
    mask = batch["data2vec2_mask"]
    images = batch[PLAIN_VIEWS][0]
    targets = objective.teacher_targets(teacher["backbone"], images)
    tokens, grid = vit.patch_embed(images)
    reg_sum, cls_sum, m = 0.0, 0.0, 0
    for row in range(6):
        image = row // 3
        keep = (~mask[row]).nonzero()[:, 0]
        x, _ = vit.run_blocks(vit.add_prefix(tokens[image : image + 1, keep]))
        full = torch.zeros(1, 64, 32)
        full[0, keep] = x[0, 1:]
        pred = objective.decoder(full, grid)[0]
        masked = mask[row]
        reg_sum = reg_sum + ((pred[masked] - targets[image][masked]) ** 2).sum() / math.sqrt(32)
        cls_sum = cls_sum + ((x[0, 0] - targets[image].mean(0)) ** 2).sum() / math.sqrt(32)
        m += int(masked.sum())
    expected = reg_sum / m + 0.01 * cls_sum
    out = objective.loss(batch, vit, teacher, StepContext())
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert m == 6 * 52


def test_official_init_fixes_sincos_positions_and_draws_the_cls_token() -> None:
    vit = tiny_vit()
    tiny_d2v2(vit)
    torch.testing.assert_close(vit.model.pos_embed[0], sincos_2d(32, (8, 8), prefix_tokens=1))
    assert 0.5 < vit.model.cls_token.std().item() < 1.5  # N(0, 1), not timm's 1e-6 / 0.02
    untouched = tiny_vit()
    tiny_d2v2(untouched, official_init=False)
    assert untouched.model.pos_embed.requires_grad


# ---------------------------------------------------------------- recipe, teacher, refusals
def test_teacher_spec_and_the_official_ema_values() -> None:
    """§3.12 test 7: get_annealed_rate(0.9998, 0.99999, t, 1e5): 0.9998, 0.999895, 0.99999 (t >= 1e5)."""
    spec = tiny_d2v2(tiny_vit()).teacher_spec()
    assert spec == TeacherSpec(0.9998, 0.99999, train_mode=False, buffers="copy", schedule="linear",
                               ramp_steps=100_000)
    m = momentum_schedule(spec.schedule, spec.momentum, spec.momentum_end, 150_001, spec.ramp_steps)
    assert m[0] == pytest.approx(0.9998) and m[50_000] == pytest.approx(0.999895)
    assert m[100_000] == pytest.approx(0.99999) and m[150_000] == pytest.approx(0.99999)


def test_recipe_defaults_follow_the_official_image_config() -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        cfg = compose("config", overrides=["objective=data2vec2", "backbone=vit_b", "dataset=imagenet"])
    d2v, opt = cfg.objective.data2vec2, cfg.optimizer
    assert (d2v.mask_prob, d2v.mask_length, d2v.mask_prob_adjust, d2v.clone_batch) == (0.8, 3, 0.07, 16)
    assert (d2v.cls_loss, d2v.loss_beta, d2v.mask_noise_std) == (0.01, 0.0, 0.01)
    assert (opt.lr, list(opt.betas), opt.weight_decay, opt.clip_grad, opt.clip_mode) == (
        1e-3, [0.9, 0.95], 0.05, 4.0, "global_norm")
    assert not opt.scale_lr_with_batch and opt.min_lr == 0.0 and opt.warmup_epochs == 10
    assert Data2Vec2.recipe_drop_path_rate == 0.0
    view = tiny_d2v2(tiny_vit()).view_spec()
    assert view.plain_crops == 1 and view.plain_crop_scale == (0.2, 1.0) and view.plain_color_jitter == 0


def test_cnn_backbones_and_bad_settings_are_refused_clearly() -> None:
    resnet = build_backbone(OmegaConf.create({"name": "resnet18", "img_size": 32}))
    cfg = OmegaConf.create(recipe_settings("data2vec2", image_size=32))
    with pytest.raises(IncompatibleConfigError, match="data2vec 2.0 needs a ViT backbone.*objective=mfm"):
        build_objective("data2vec2", cfg, resnet)
    with pytest.raises(IncompatibleConfigError, match="visible"):
        tiny_d2v2(tiny_vit(), image_size=4)  # a 2 x 2 grid: no visible token left
    with pytest.raises(IncompatibleConfigError, match="top_k=9"):
        tiny_d2v2(tiny_vit(), top_k=9)
    with pytest.raises(IncompatibleConfigError, match="mask_prob"):
        tiny_d2v2(tiny_vit(), mask_prob=1.0)


def test_composites_share_crops_with_mae_and_refuse_dino() -> None:
    """data2vec 2.0 and MAE use the same plain crop (0.2-1, no jitter): one backbone trains on the
    weighted sum. DINO's teacher (train mode, buffers kept) cannot be data2vec's (eval, copied)."""
    vit = tiny_vit(depth=2)
    d2v = tiny_d2v2(vit)
    mae = MAE(vit, **recipe_settings("mae", image_size=IMAGE, decoder_dim=32, decoder_depth=1,
                                     decoder_heads=2))
    assert merge_view_specs([mae.view_spec(), d2v.view_spec()]).plain_crops == 1
    weights = {"mae": 1.0, "data2vec2": 0.5}
    module = SSLModule(vit, {"mae": mae, "data2vec2": d2v}, weights, None, batch_size=2)
    batch = batch_for(d2v, n=2)
    batch.update(mae.batch_maskers()[0](2, torch.Generator().manual_seed(1)), index=torch.arange(2))
    teacher = module.teacher.module
    torch.manual_seed(0)
    separate = mae.loss(batch, vit, None, StepContext()).loss
    separate = separate + 0.5 * d2v.loss(batch, vit, teacher, StepContext()).loss
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        combined = module.training_step(batch, 0)
    torch.testing.assert_close(combined, separate)

    dino = DINO(vit.embed_dim, **recipe_settings("dino", out_dim=64, hidden_dim=32, bottleneck_dim=16))
    both = SSLModule(vit, {"dino": dino, "data2vec2": d2v}, {}, None, batch_size=2)
    assert both.teacher.spec == dino.teacher_spec()  # DINO's teacher, and data2vec 2.0 keeps its own
    assert set(both.teachers) == {"data2vec2"} and both.teachers["data2vec2"].spec == d2v.teacher_spec()


def test_one_optimizer_step_has_no_host_sync() -> None:
    """The full step (fused AdamW, clipping, the gated EMA) with the data2vec2 recipe: no .item(),
    no data-sized op (the masked count comes from torch.where, never a boolean selection)."""
    module = build()
    module.optim_cfg = OmegaConf.load(f"{CONFIG_DIR}/optimizer/data2vec2.yaml")
    module.train()
    optim = module.configure_optimizers()
    module.schedules = module.build_schedules(100, 10)
    batch = global_batch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        training_step(module, optim, batch)  # warm-up: optimizer state, schedules on the device
        with SyncDetector() as detector:
            training_step(module, optim, batch)
    assert detector.syncs == [], detector.report()
