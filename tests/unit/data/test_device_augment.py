"""data.augment_on=device: workers crop to uint8 and draw; the device applies the photometric half.

The batched ops are checked crop by crop against torchvision's tensor functionals, the draws
against the recipe's probabilities and ranges, and the whole path through the data module and a
real `ssl.pretrain` run.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from omegaconf import OmegaConf
from synthetic import NoiseImages, three_classes
from torchvision.transforms.v2 import functional as TF

from ssl.data import device_augment as D
from ssl.data.datamodule import PretrainDataModule, merge_view_specs
from ssl.data.multicrop import MultiCropTransform
from ssl.data.photometric import NUM_DRAWS, photometric
from ssl.data.plain_crop import PlainCropTransform
from ssl.data.pretrain_views import PretrainViews
from ssl.data.spec import ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.objectives.coke import MULTI_VIEW_CROPS
from ssl.objectives.dino import DINO_CROPS

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": list(MEAN), "std": list(STD),
})
COLOURFUL = NoiseImages(12, 20, 24, label=three_classes)




@pytest.mark.parametrize(("ours", "reference", "low", "high"), [
    (D.adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (D.adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (D.adjust_saturation, TF.adjust_saturation, 0.2, 1.8),
    (D.adjust_hue, TF.adjust_hue, -0.49, 0.49),
])
def test_each_jitter_op_matches_torchvision_per_image(ours, reference, low, high) -> None:
    torch.manual_seed(0)
    x = torch.rand(8, 3, 9, 11)
    x[0] = 0.5  # a grey image: zero chroma, the hue's special case
    factors = torch.empty(8).uniform_(low, high)
    expected = torch.stack([reference(x[i], float(factors[i])) for i in range(8)])
    torch.testing.assert_close(ours(x, factors), expected, atol=2e-6, rtol=0)


def test_blur_matches_torchvision_per_image_and_identity_factors_change_nothing() -> None:
    torch.manual_seed(1)
    x = torch.rand(5, 3, 16, 14)
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.7, 2.0])
    expected = torch.stack([TF.gaussian_blur(x[i], [13, 13], [float(s)] * 2) for i, s in enumerate(sigma)])
    torch.testing.assert_close(D.gaussian_blur(x, sigma, 13), expected, atol=2e-6, rtol=0)
    ones = torch.ones(5)
    for op in (D.adjust_brightness, D.adjust_contrast, D.adjust_saturation):
        assert torch.equal(op(x, ones), x)
    torch.testing.assert_close(D.adjust_hue(x, torch.zeros(5)), x, atol=2e-6, rtol=0)


def reference_crop(crop: torch.Tensor, row: torch.Tensor, spec: D.Photometric) -> torch.Tensor:
    """One crop finished with torchvision's functionals in the recipe's order."""
    x = crop.float() / 255
    if row[D.JITTER_ON] > 0.5:
        ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
        columns = [D.BRIGHTNESS, D.CONTRAST, D.SATURATION, D.HUE]
        for k in row[D.ORDER].long().tolist():
            if spec.jitter[k]:
                x = ops[k](x, float(row[columns[k]]))
    if row[D.GRAYSCALE] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[D.BLUR] > 0.5:
        k, s = spec.kernel_size(), float(row[D.SIGMA])
        x = TF.gaussian_blur(x, [k, k], [s, s])
    if row[D.SOLARIZE] > 0.5:
        x = TF.solarize(x, 128 / 255)
    return TF.normalize(x, list(MEAN), list(STD))


SPECS = {
    **MultiCropTransform(2, 2, 24, 12, recipe=DINO_CROPS).photometric,
    "coke_local": MultiCropTransform(2, 2, 24, 12, recipe=MULTI_VIEW_CROPS).photometric["local"],
    "data2vec_plain": PlainCropTransform(24, color_jitter=0.4).photometric,  # no hue, always on
    "hue_only": D.Photometric((0.0, 0.0, 0.0, 0.3), 0.7),
}


@pytest.mark.parametrize("kind", list(SPECS))
def test_batched_photometric_equals_the_crop_by_crop_reference(kind: str) -> None:
    """Every crop gets its own flags, factors, op order and sigma, in one batched call."""
    spec = SPECS[kind]
    torch.manual_seed(2)
    crops = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8)
    draws = torch.stack([spec.draw() for _ in range(64)])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (MEAN, STD))
    out = D.apply_photometric(crops, draws, spec, mean, std)
    expected = torch.stack([reference_crop(crops[i], draws[i], spec) for i in range(64)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert out.dtype == torch.float32 and out.shape == crops.shape


def test_draws_follow_the_recipe_probabilities_and_ranges() -> None:
    spec = photometric((0.4, 0.4, 0.2, 0.1), blur=0.5, solarize=0.2, size=224)
    torch.manual_seed(3)
    n = 4000
    draws = torch.stack([spec.draw() for _ in range(n)])

    def rate(column: int) -> float:
        return float((draws[:, column] > 0.5).float().mean())

    for column, p in ((D.JITTER_ON, 0.8), (D.GRAYSCALE, 0.2), (D.BLUR, 0.5), (D.SOLARIZE, 0.2)):
        assert abs(rate(column) - p) < 4 * math.sqrt(p * (1 - p) / n), (column, rate(column))
    for column, (low, high) in ((D.BRIGHTNESS, (0.6, 1.4)), (D.CONTRAST, (0.6, 1.4)),
                                (D.SATURATION, (0.8, 1.2)), (D.HUE, (-0.1, 0.1)), (D.SIGMA, (0.1, 2.0))):
        values = draws[:, column]
        assert low <= float(values.min()) and float(values.max()) <= high
        assert float(values.max() - values.min()) > 0.9 * (high - low)  # the whole range is used
    orders = draws[:, D.ORDER].long()
    assert torch.equal(orders.sort(dim=1).values, torch.arange(4).expand(n, 4))
    assert len({tuple(o) for o in orders.tolist()}) == 24  # every op order occurs
    torch.manual_seed(9)
    a = spec.draw()
    torch.manual_seed(9)
    assert torch.equal(a, spec.draw())


def test_data_module_ships_uint8_and_the_device_hook_finishes_the_views() -> None:
    views = merge_view_specs([ViewSpec(2, 3, 1)])
    data = PretrainDataModule(DATASET, views, batch_size=4, num_workers=0, dataset=COLOURFUL,
                              augment_on="device")
    cpu = PretrainDataModule(DATASET, views, batch_size=4, num_workers=0, dataset=COLOURFUL)
    raw = next(iter(data.train_dataloader()))
    assert all(v.dtype == torch.uint8 for v in raw["views"] + raw["plain_views"])
    assert [tuple(d.shape) for d in raw[D.VIEW_DRAWS]] == [(4, NUM_DRAWS)] * 5
    again = next(iter(data.train_dataloader()))  # the same seed: the same crops and draws
    first, second = raw["views"] + raw[D.VIEW_DRAWS], again["views"] + again[D.VIEW_DRAWS]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    finished = data.on_after_batch_transfer(raw, 0)
    reference = next(iter(cpu.train_dataloader()))
    assert D.VIEW_DRAWS not in finished and D.PLAIN_DRAWS not in finished
    for ours, theirs in zip(finished["views"] + finished["plain_views"],
                            reference["views"] + reference["plain_views"]):
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    assert all(lo - 1e-5 <= float(v.min()) and float(v.max()) <= hi + 1e-5 for v in finished["views"])
    assert cpu.on_after_batch_transfer(reference, 0) is reference  # augment_on=cpu: untouched


def test_plain_views_without_jitter_are_only_normalised_on_the_device() -> None:
    """MAE / MFM's crop + flip: the device path equals the CPU path seed for seed."""
    plain = PlainCropTransform(16, (0.2, 1.0), MEAN, STD)
    views = PretrainViews(None, plain, 1, augment_on="device")
    image = COLOURFUL[0][0]
    torch.manual_seed(4)
    deferred = views(image)
    torch.manual_seed(4)
    expected = plain(image)
    batch = {"plain_views": [deferred["plain_views"][0][None]],
             D.PLAIN_DRAWS: [deferred[D.PLAIN_DRAWS][0][None]]}
    finished = views.device_augment(MEAN, STD)(batch)
    torch.testing.assert_close(finished["plain_views"][0][0], expected, atol=1e-5, rtol=0)


def test_an_unknown_augment_on_lists_the_valid_values() -> None:
    with pytest.raises(IncompatibleConfigError, match="data.augment_on='gpu'; valid values: cpu, device"):
        PretrainDataModule(DATASET, ViewSpec(2, 2), 4, 0, dataset=COLOURFUL, augment_on="gpu")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize(
    ("objective", "crop_on"), [("dino", "worker"), ("data2vec", "worker"), ("dino", "device")]
)
def test_pretrain_runs_with_device_augmentation(tmp_path, objective: str, crop_on: str) -> None:
    """Lightning calls the data module's hook: a uint8 view, or no views at all, would fail."""
    run_dir = tmp_path / objective
    args = [
        sys.executable, "-m", "ssl.pretrain", f"objective={objective}", "backbone=vit_t",
        "+backbone.kwargs.depth=2", "data.augment_on=device", f"data.crop_on={crop_on}",
        "data.batch_size=8", "data.num_workers=1",
        "trainer.limit_train_batches=2", "trainer.max_epochs=1", "knn.enabled=false",
        "export.enabled=false", "reconstructions.enabled=false", "attention_maps.enabled=false",
        f"hydra.run.dir={run_dir}",
    ]
    if objective == "dino":
        args += ["objective.dino.out_dim=256", "objective.dino.hidden_dim=128",
                 "objective.dino.local_crops=2"]
    else:
        args += ["objective.data2vec.top_k=2"]
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert "augment_on: device" in (run_dir / "config.yaml").read_text()
