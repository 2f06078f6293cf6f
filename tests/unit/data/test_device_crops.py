"""data.crop_on=device: boxes drawn as torchvision draws them, crops cut in batch by roi_align."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from ssl.data import device_augment as D
from ssl.data.datamodule import PretrainDataModule, merge_view_specs
from ssl.data.device_crops import FLIP, SOURCE, VIEW_BOXES, draw_box, resized_crops
from ssl.data.spec import ViewSpec
from ssl.errors import IncompatibleConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 32, "local_crop_size": 16, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": list(MEAN), "std": list(STD),
})


def smooth_image(seed: int, height: int = 48, width: int = 64) -> Image.Image:
    """A smooth colour field: resampling filters agree on it, so geometry is what is compared."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=g)
    fine = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)
    return Image.fromarray((fine[0].clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy())


class SmoothImages(Dataset):
    def __init__(self, sizes: list[tuple[int, int]] | None = None) -> None:
        self.sizes = sizes or [(48, 64)] * 16

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return smooth_image(i, *self.sizes[i]), 0


def test_boxes_are_torchvisions_crop_and_flip_draws_seed_for_seed() -> None:
    image = smooth_image(0)
    for seed in range(30):
        torch.manual_seed(seed)
        box = draw_box(image, (0.08, 1.0))
        torch.manual_seed(seed)
        top, left, h, w = T.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
        flip = float(torch.rand(1) < 0.5)
        assert box.tolist() == [left, top, left + w, top + h, flip]


def test_enlarging_crops_are_bilinear_resized_crops_inside_the_border() -> None:
    torch.manual_seed(0)
    images = torch.rand(3, 3, 20, 24)
    boxes = torch.tensor([[3.0, 2, 11, 8, 0], [0, 0, 12, 12, 0], [10, 5, 24, 20, 0]])
    out = resized_crops(images, boxes, 28)
    for image, (x1, y1, x2, y2, _), crop in zip(images, boxes.tolist(), out):
        expected = TF.resized_crop(image, int(y1), int(x1), int(y2 - y1), int(x2 - x1), [28, 28],
                                   interpolation=T.InterpolationMode.BILINEAR, antialias=False)
        # The outermost pixels differ: roi_align reads the image's next row / column there, a crop
        # taken first clamps to its own edge.
        torch.testing.assert_close(crop[:, 2:-2, 2:-2], expected[:, 2:-2, 2:-2], atol=1e-5, rtol=0)


def test_shrinking_crops_average_like_an_antialiased_resize_and_flip_mirrors() -> None:
    image = TF.to_dtype(TF.pil_to_tensor(smooth_image(1, 96, 128)), torch.float32, scale=True)
    boxes = torch.tensor([[8.0, 4, 104, 88, 0], [8.0, 4, 104, 88, 1]])
    plain, flipped = resized_crops(image.expand(2, -1, -1, -1).contiguous(), boxes, 24)
    expected = TF.resized_crop(image, 4, 8, 84, 96, [24, 24], antialias=True)
    assert float((plain - expected).abs().mean()) < 0.005  # measured ~0.001 of the [0, 1] range
    assert torch.equal(flipped, plain.flip(-1))
    assert boxes[1, FLIP] == 1


def test_device_crops_match_the_worker_crops_drawn_from_the_same_seed() -> None:
    """Same draws in both modes; only the resampling filter differs (bicubic PIL vs roi_align)."""
    views = merge_view_specs([ViewSpec(2, 4, 1)])

    def finished(crop_on: str, seed: int) -> dict:
        data = PretrainDataModule(DATASET, views, batch_size=8, num_workers=0, dataset=SmoothImages(),
                                  augment_on="device", crop_on=crop_on, seed=seed)
        return data.on_after_batch_transfer(next(iter(data.train_dataloader())), 0)

    on_device, in_worker, other_seed = finished("device", 0), finished("worker", 0), finished("device", 1)
    for kind in ("views", "plain_views"):
        for a, b, c in zip(on_device[kind], in_worker[kind], other_seed[kind]):
            assert a.shape == b.shape and a.dtype == b.dtype == torch.float32
            same = float((a - b).abs().mean())
            assert same < 0.02, same  # normalised units: about one grey level (measured ~0.005)
            assert float((a - c).abs().mean()) > 20 * same  # other draws: other crops (~1.1)


def test_the_batch_carries_images_once_and_boxes() -> None:
    data = PretrainDataModule(DATASET, merge_view_specs([ViewSpec(2, 3)]), batch_size=4, num_workers=0,
                              dataset=SmoothImages(), augment_on="device", crop_on="device")
    batch = next(iter(data.train_dataloader()))
    assert batch[SOURCE].dtype == torch.uint8 and batch[SOURCE].shape == (4, 3, 48, 64)
    assert [tuple(b.shape) for b in batch[VIEW_BOXES]] == [(4, 5)] * 5
    assert "views" not in batch and len(batch[D.VIEW_DRAWS]) == 5
    done = data.on_after_batch_transfer(batch, 0)
    assert [tuple(v.shape) for v in done["views"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert SOURCE not in done and VIEW_BOXES not in done and D.VIEW_DRAWS not in done


def test_images_of_different_sizes_and_bad_settings_say_what_to_do() -> None:
    mixed = SmoothImages([(48, 64), (40, 64)] * 4)
    data = PretrainDataModule(DATASET, ViewSpec(2, 2), 4, 0, dataset=mixed, augment_on="device",
                              crop_on="device")
    with pytest.raises(ValueError, match="data.crop_on=device needs images of one size.*data.crop_on=worker"):
        next(iter(data.train_dataloader()))
    with pytest.raises(IncompatibleConfigError, match="crop_on=device needs augment_on=device"):
        PretrainDataModule(DATASET, ViewSpec(2, 2), 4, 0, dataset=mixed, crop_on="device")
    with pytest.raises(IncompatibleConfigError, match="valid: data.crop_on=worker or device"):
        PretrainDataModule(DATASET, ViewSpec(2, 2), 4, 0, dataset=mixed, crop_on="gpu")
