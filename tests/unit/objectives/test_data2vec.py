"""data2vec: block masks, targets, loss conventions (methods.md §3.12), the objective and its teacher."""

import math
import random

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from synthetic import NoiseImages

from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import PretrainDataModule
from ssl.data.masking import BlockMasker, BlockMaskGenerator
from ssl.errors import IncompatibleConfigError
from ssl.losses.data2vec import data2vec_targets, regression_loss
from ssl.module import SSLModule
from ssl.objectives import build_objective, recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.data2vec import Data2Vec
from ssl.optim.schedules import linear_ramp_schedule, momentum_schedule
from ssl.teacher import TeacherSpec

Y1 = torch.tensor([[1.0, 2, 3, 4], [2, 0, 0, 2]])[None]
Y2 = torch.tensor([[0.0, 1, 0, 1], [4, 3, 2, 1]])[None]
DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5] * 3, "std": [0.25] * 3,
})


def tiny_vit(depth: int = 3, **kwargs):
    torch.manual_seed(0)
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": 0.1,
        "kwargs": {"depth": depth, "embed_dim": 32, "num_heads": 2, **kwargs}}))


def official_beit_mask(
    rng: random.Random, height: int, width: int, target: int, min_block: int
) -> np.ndarray:
    """BEiT's MaskingGenerator.__call__ / _mask, written out independently from its description."""
    mask = np.zeros((height, width), dtype=np.int64)
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    count = 0
    while count < target:
        limit = target - count
        delta = 0
        for _ in range(10):
            area = rng.uniform(min_block, limit)
            ratio = math.exp(rng.uniform(*log_ratio))
            h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if w < width and h < height:
                top, left = rng.randint(0, height - h), rng.randint(0, width - w)
                covered = mask[top:top + h, left:left + w].sum()
                if 0 < h * w - covered <= limit:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
                if delta > 0:
                    break
        if delta == 0:
            break
        count += delta
    return mask


# ---------------------------------------------------------------- targets and loss (pure)
def test_layer_norm_targets_known_values() -> None:
    t = data2vec_targets([Y1, Y2], top_k=2, layer_norm="layer", final_layer_norm=True)[0]
    assert torch.allclose(t[0], torch.tensor([-1.376374, 0.324911, -0.324911, 1.376374]), atol=1e-5)
    assert torch.allclose(t[1], torch.tensor([1.655774, -0.390875, -1.023324, -0.241575]), atol=1e-5)


def test_instance_norm_targets_known_values() -> None:
    t = data2vec_targets([Y1, Y2], top_k=2, layer_norm="instance", final_layer_norm=True)[0]
    assert torch.allclose(t[0], torch.tensor([-1.605882, 0.229410, 0.229412, 1.147061]), atol=1e-5)
    assert torch.allclose(t[1], -t[0], atol=1e-5)


def test_top_k_picks_the_last_layers_and_hand_computation() -> None:
    layers = [torch.randn(2, 3, 4) for _ in range(4)]
    t = data2vec_targets(layers, top_k=2, layer_norm="none", final_layer_norm=False)
    assert torch.allclose(t, (layers[2] + layers[3]) / 2)
    ln = data2vec_targets(layers[-1:], top_k=1, layer_norm="layer", final_layer_norm=False)
    x = layers[-1]
    hand = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5)
    assert torch.allclose(ln, hand, atol=1e-5)
    with pytest.raises(ValueError, match="top_k"):
        data2vec_targets(layers, top_k=5)
    with pytest.raises(ValueError, match="valid"):
        data2vec_targets(layers, top_k=1, layer_norm="batch")


def test_smooth_l1_and_l2_conventions() -> None:
    for d, expected in [(1.0, 0.25), (2.0, 1.0), (3.0, 2.0)]:
        loss = regression_loss(torch.tensor([d]), torch.tensor([0.0]), beta=2.0)
        assert loss.item() == pytest.approx(expected)
    target = data2vec_targets([Y1, Y2], 2)[0]
    assert regression_loss(torch.zeros_like(target), target, 2.0).item() == pytest.approx(0.2499958, abs=1e-6)
    assert regression_loss(torch.ones(3), torch.zeros(3), beta=0.0).item() == pytest.approx(1.0)


def test_momentum_schedules() -> None:
    ramp = linear_ramp_schedule(0.9998, 0.99999, 200_000, 100_000)
    assert ramp[0] == pytest.approx(0.9998) and ramp[50_000] == pytest.approx(0.999895)
    assert ramp[100_000] == pytest.approx(0.99999) and ramp[-1] == pytest.approx(0.99999)
    assert np.all(momentum_schedule("constant", 0.9998, 0.99999, 50) == 0.9998)
    with pytest.raises(ValueError, match="valid"):
        momentum_schedule("step", 0.9, 1.0, 10)


# ---------------------------------------------------------------- block masks
def test_block_masks_match_the_beit_procedure_for_the_same_rng() -> None:
    generator = BlockMaskGenerator((14, 14), 120, min_block=16)
    for seed in range(20):
        ours = generator.one(random.Random(seed))
        theirs = official_beit_mask(random.Random(seed), 14, 14, 120, 16)
        assert np.array_equal(ours.numpy().astype(np.int64), theirs), seed


def test_block_mask_counts_and_rectangles() -> None:
    generator = BlockMaskGenerator((14, 14), 120, min_block=16)
    masks = generator(500, torch.Generator().manual_seed(0))
    counts = masks.sum(1)
    assert masks.shape == (500, 196) and masks.dtype == torch.bool
    assert int(counts.max()) <= 120
    assert (counts == 120).float().mean() > 0.5 and counts.float().mean() > 115
    assert len(set(counts.tolist())) > 1  # counts may differ between images
    # Every accepted block is a rectangle inside the grid, smaller than it, adding <= the limit.
    blocks = []
    original = generator._add_block

    def spy(mask: torch.Tensor, limit: int, rng: random.Random) -> int:
        before = mask.clone()
        added = original(mask, limit, rng)
        if added:
            rows, cols = torch.nonzero(mask & ~before, as_tuple=True)
            blocks.append((added, limit, rows, cols, before, mask.clone()))
        return added

    generator._add_block = spy
    generator.one(random.Random(1))
    assert blocks
    for added, limit, rows, cols, _before, after in blocks:
        assert added <= limit
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        assert bottom - top + 1 < 14 and right - left + 1 < 14
        box = after[top:bottom + 1, left:right + 1]
        assert bool(box.all())  # the new patches fill a rectangle (with what was there before)


def test_scaled_generator_and_clone_masks() -> None:
    g = BlockMaskGenerator.scaled((14, 14))
    assert (g.num_masked, g.min_block) == (120, 16)
    small = BlockMaskGenerator.scaled((7, 7))
    assert (small.num_masked, small.min_block) == (30, 4)
    out = BlockMasker(small, prefix="data2vec", copies=3)(4)
    assert out["data2vec_mask"].shape == (12, 49)
    with pytest.raises(ValueError, match="num_masked"):
        BlockMaskGenerator((4, 4), 16)


# ---------------------------------------------------------------- objective
def make_objective(backbone, **kwargs) -> Data2Vec:
    return Data2Vec(backbone, **recipe_settings("data2vec", image_size=16, **kwargs))


def test_resnet_is_rejected() -> None:
    resnet = build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 32, "patch_size": 4, "drop_path_rate": None, "kwargs": {}}))
    cfg = OmegaConf.load("conf/objective/data2vec.yaml")
    cfg.image_size = 32
    with pytest.raises(IncompatibleConfigError, match="data2vec needs a ViT"):
        build_objective("data2vec", cfg, resnet)


def test_student_sees_mask_tokens_and_teacher_the_clean_image() -> None:
    backbone = tiny_vit()
    module = SSLModule(backbone, {"data2vec": make_objective(backbone, top_k=2)}, {"data2vec": 1.0},
                       OmegaConf.load("conf/optimizer/data2vec.yaml"), batch_size=3)
    objective = module.objectives["data2vec"]
    teacher = module.teacher.module
    images = torch.randn(3, 3, 16, 16)
    mask = BlockMasker(objective.mask_generator, prefix="data2vec")(3)["data2vec_mask"]
    seen = {}
    teacher["backbone"].model.patch_embed.register_forward_hook(lambda m, i, o: seen.update(t=i[0]))
    out = objective.loss({"plain_views": [images], "data2vec_mask": mask}, backbone, teacher, StepContext())
    assert torch.equal(seen["t"], images)  # unmasked, float32
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert objective.mask_token.grad is not None and objective.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    # Masked selection: M rows, in (batch, position) order.
    with torch.no_grad():
        targets = objective.teacher_targets(teacher["backbone"], images)
    assert targets[mask].shape == (int(mask.sum()), 32)
    b, pos = torch.nonzero(mask, as_tuple=True)
    assert torch.equal(targets[mask][0], targets[b[0], pos[0]])


def test_mask_token_replaces_masked_patches_before_positions() -> None:
    backbone = tiny_vit()
    backbone.eval()
    objective = make_objective(backbone)
    images = torch.randn(2, 3, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    other = images.clone()
    other[:, :, :4, :] = torch.randn(2, 3, 4, 16)  # change only the masked first row of patches
    mask4 = torch.zeros(2, 16, dtype=torch.bool)
    mask4[:, :4] = True
    a = objective.student_predictions(backbone, images, mask4)
    b = objective.student_predictions(backbone, other, mask4)
    assert torch.allclose(a, b, atol=1e-5)  # what is under the mask token is never seen


def test_clone_batch_shares_one_teacher_pass() -> None:
    backbone = tiny_vit()
    objective = make_objective(backbone, clone_batch=4)
    module = SSLModule(backbone, {"data2vec": objective}, {"data2vec": 1.0},
                       OmegaConf.load("conf/optimizer/data2vec.yaml"), batch_size=2)
    calls = []
    first_block = module.teacher.module["backbone"].model.blocks[0]
    first_block.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    batch = {"plain_views": [torch.randn(2, 3, 16, 16)], **objective.batch_maskers()[0](2)}
    assert batch["data2vec_mask"].shape == (8, 16)
    out = objective.loss(batch, backbone, module.teacher.module, StepContext())
    assert calls == [2] and torch.isfinite(out.loss)


def test_teacher_spec_and_config() -> None:
    cfg = OmegaConf.load("conf/objective/data2vec.yaml")
    cfg.image_size = 16
    objective = build_objective("data2vec", cfg, tiny_vit(depth=8))
    spec = objective.teacher_spec()
    assert (spec.momentum, spec.schedule) == (0.9998, "constant")
    assert (spec.train_mode, spec.buffers) == (False, "copy")
    assert objective.top_k == 6
    assert build_objective("data2vec", cfg, tiny_vit(depth=3)).top_k == 3
    cfg.teacher.schedule, cfg.target_norm = "linear", "instance"
    objective = build_objective("data2vec", cfg, tiny_vit())
    assert objective.teacher_spec().schedule == "linear" and objective.teacher_spec().ramp_steps == 100_000


# ---------------------------------------------------------------- teacher in a real fit


class ModeSpy(pl.Callback):
    def __init__(self) -> None:
        self.teacher_modes: list[bool] = []
        self.student_modes: list[bool] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.teacher_modes.append(any(m.training for m in module.teacher.modules()))
        self.student_modes.append(module.backbone.training)


def test_teacher_stays_in_eval_mode_across_epochs_and_moves_by_ema() -> None:
    backbone = tiny_vit()
    objective = make_objective(backbone)
    optim = OmegaConf.load("conf/optimizer/data2vec.yaml")
    module = SSLModule(backbone, {"data2vec": objective}, {"data2vec": 1.0}, optim, batch_size=4)
    data = PretrainDataModule(DATASET, objective.view_spec(), 4, 0, dataset=NoiseImages(12),
                              maskers=objective.batch_maskers())
    spy = ModeSpy()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[spy])
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 6 and all(spy.student_modes)
    assert not any(spy.teacher_modes)  # never in train mode, also after the epoch boundary


def test_ema_step_values_with_copied_buffers() -> None:
    backbone = tiny_vit()
    objective = make_objective(backbone)
    module = SSLModule(backbone, {"data2vec": objective}, {"data2vec": 1.0},
                       OmegaConf.load("conf/optimizer/data2vec.yaml"), batch_size=4)
    before = [p.clone() for p in module.teacher.module.parameters()]
    with torch.no_grad():
        for p in module.backbone.parameters():
            p.add_(1.0)
    module.teacher.update(module.mirrored_by_teacher(), 0.9998)
    for b, t, s in zip(before, module.teacher.module.parameters(), module.mirrored_by_teacher().parameters()):
        assert torch.allclose(t, 0.9998 * b + 0.0002 * s, atol=1e-6)
    assert set(module.mirrored_by_teacher()) == {"backbone"}  # the regression head is student-only
    assert isinstance(module.teacher.spec, TeacherSpec) and module.teacher.spec.buffers == "copy"
