"""The pretraining data module: the union of the objectives' views, masks drawn in the collate step."""

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset

from ssl.data.datamodule import MaskingCollate, PretrainDataModule, merge_view_specs
from ssl.data.masking import RandomTokenMasker
from ssl.data.plain_crop import PlainCropTransform
from ssl.data.spec import CropRecipe, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.objectives.coke import MULTI_VIEW_CROPS, SINGLE_VIEW_CROPS
from ssl.objectives.dino import DINO_CROPS

DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
})


class Gradients(Dataset):
    def __len__(self) -> int:
        return 10

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        values = (torch.arange(20 * 20).reshape(20, 20) * (i + 1)) % 256
        return Image.fromarray(values.to(torch.uint8).numpy()).convert("RGB"), i % 3


def test_merge_is_the_union_and_rejects_conflicts() -> None:
    merged = merge_view_specs([ViewSpec(2, 6), ViewSpec(plain_crops=1)])
    assert (merged.global_crops, merged.local_crops, merged.plain_crops) == (2, 6, 1)
    with pytest.raises(IncompatibleConfigError, match="different \\(scale, colour jitter\\)"):
        merge_view_specs([ViewSpec(plain_crops=1, plain_crop_scale=(0.2, 1.0)),
                          ViewSpec(plain_crops=1, plain_crop_scale=(0.5, 1.0))])
    with pytest.raises(IncompatibleConfigError, match="no views"):
        merge_view_specs([ViewSpec()])


def test_merge_keeps_the_crop_recipe_and_rejects_conflicts() -> None:
    coke = ViewSpec(2, 6, crop_recipe=MULTI_VIEW_CROPS, global_crop_scale=(0.08, 1.0),
                    local_crop_scale=(0.05, 0.6))
    merged = merge_view_specs([coke, ViewSpec(plain_crops=1)])
    assert (merged.crop_recipe, merged.global_crop_scale, merged.local_crop_scale) == (
        MULTI_VIEW_CROPS, (0.08, 1.0), (0.05, 0.6)
    )
    # Specs without global crops have no say; config lists compare equal to tuples.
    merged = merge_view_specs([coke, ViewSpec(2, 0, crop_recipe=MULTI_VIEW_CROPS, global_crop_scale=[0.08, 1],
                                              local_crop_scale=[0.05, 0.6]), ViewSpec(plain_crops=1)])
    assert (merged.global_crops, merged.local_crops, merged.crop_recipe) == (2, 6, MULTI_VIEW_CROPS)
    assert merge_view_specs([ViewSpec(2, 6)]).crop_recipe == CropRecipe()
    with pytest.raises(IncompatibleConfigError, match="crop recipe.*\\(coke,.*\\(dino,.*same crop recipe"):
        merge_view_specs([ViewSpec(2, 6, crop_recipe=DINO_CROPS), coke])
    with pytest.raises(IncompatibleConfigError, match="\\(0.08, 1.0\\).*None = the dataset's"):
        merge_view_specs([ViewSpec(2), ViewSpec(2, global_crop_scale=(0.08, 1.0))])


def test_coke_single_view_reaches_the_batch() -> None:
    views = ViewSpec(global_crops=1, crop_recipe=SINGLE_VIEW_CROPS, global_crop_scale=(0.08, 1.0))
    data = PretrainDataModule(DATASET, merge_view_specs([views]), batch_size=4, num_workers=0,
                              dataset=Gradients())
    multicrop = data.transform().multicrop
    assert multicrop.recipe is SINGLE_VIEW_CROPS
    assert (multicrop.global_scale, multicrop.local_scale) == ((0.08, 1.0), (0.05, 0.4))
    batch = next(iter(data.train_dataloader()))
    assert len(batch["views"]) == 1 and batch["views"][0].shape == (4, 3, 16, 16)
    assert "plain_views" not in batch


def test_plain_crops_and_masks_reach_the_batch() -> None:
    masker = RandomTokenMasker(16, 0.75, prefix="mae")
    data = PretrainDataModule(DATASET, ViewSpec(plain_crops=1), batch_size=4, num_workers=0,
                              dataset=Gradients(), maskers=[masker])
    batch = next(iter(data.train_dataloader()))
    assert "views" not in batch
    assert len(batch["plain_views"]) == 1 and batch["plain_views"][0].shape == (4, 3, 16, 16)
    assert batch["mae_mask"].shape == (4, 16) and batch["mae_ids_restore"].shape == (4, 16)
    assert batch["index"].shape == (4,)


def test_multicrop_and_plain_views_together() -> None:
    data = PretrainDataModule(DATASET, ViewSpec(2, 2, 1), batch_size=2, num_workers=0, dataset=Gradients())
    batch = next(iter(data.train_dataloader()))
    assert [tuple(v.shape[-2:]) for v in batch["views"]] == [(16, 16), (16, 16), (8, 8), (8, 8)]
    assert batch["plain_views"][0].shape == (2, 3, 16, 16)


def test_masks_differ_across_batches_and_follow_the_seed() -> None:
    collate = MaskingCollate([RandomTokenMasker(16, 0.5, prefix="mae")])
    samples = [{"x": torch.zeros(1), "index": i} for i in range(3)]
    torch.manual_seed(0)
    a, b = collate(samples), collate(samples)
    torch.manual_seed(0)
    c = collate(samples)
    assert not torch.equal(a["mae_ids_shuffle"], b["mae_ids_shuffle"])
    assert torch.equal(a["mae_ids_shuffle"], c["mae_ids_shuffle"])


def test_plain_crop_is_crop_and_flip_only() -> None:
    """No colour change: a constant grey image stays constant (the multi-crop jitter would not)."""
    transform = PlainCropTransform(12, (0.2, 1.0), mean=(0.5,) * 3, std=(0.25,) * 3)
    image = Image.new("RGB", (20, 20), (64, 64, 64))
    for _ in range(5):
        crop = transform(image)
        assert crop.shape == (3, 12, 12)
        assert torch.allclose(crop, torch.full_like(crop, (64 / 255 - 0.5) / 0.25), atol=1e-5)
