"""Every pretraining view a set of objectives asks for, from one decoded image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ssl.data.device_augment import DeviceAugment
from ssl.data.device_crops import CROP_ON, PLAIN_BOXES, SOURCE, VIEW_BOXES
from ssl.data.multicrop import MultiCropTransform
from ssl.data.photometric import PLAIN_DRAWS, VIEW_DRAWS
from ssl.data.pil_ops import to_uint8_tensor
from ssl.data.plain_crop import PlainCropTransform
from ssl.data.spec import PLAIN_VIEWS, VIEWS

AUGMENT_ON = ("cpu", "device")


class PretrainViews:
    """Every view a set of objectives asks for, as a dict: VIEWS (multi-crop), PLAIN_VIEWS.

    augment_on="device": the crops are uint8 with their photometric draws beside them
    (VIEW_DRAWS, PLAIN_DRAWS). crop_on="device" as well: the decoded image (SOURCE) with one box
    per crop instead of the crops (VIEW_BOXES, PLAIN_BOXES). `device_augment()` finishes either on
    the training device.
    """

    def __init__(self, multicrop: MultiCropTransform | None, plain: PlainCropTransform | None,
                 plain_crops: int = 0, augment_on: str = "cpu", crop_on: str = "worker") -> None:
        if augment_on not in AUGMENT_ON:
            raise ValueError(f"data.augment_on={augment_on!r}; valid values: {', '.join(AUGMENT_ON)}")
        if crop_on not in CROP_ON:
            raise ValueError(f"data.crop_on={crop_on!r}; valid values: {', '.join(CROP_ON)}")
        if crop_on == "device" and augment_on != "device":
            raise ValueError("data.crop_on=device needs data.augment_on=device (the colour "
                             "augmentations follow the crops onto the device)")
        self.multicrop = multicrop
        self.plain = plain
        self.plain_crops = plain_crops if plain is not None else 0
        self.augment_on = augment_on
        self.crop_on = crop_on

    def __call__(self, image: Image.Image) -> dict[str, Any]:
        if self.crop_on == "device":
            return self.boxes(image)
        out: dict[str, list[torch.Tensor]] = {}
        deferred = self.augment_on == "device"
        if self.multicrop is not None:
            if deferred:
                out[VIEWS], out[VIEW_DRAWS] = self.multicrop.crops_and_draws(image)
            else:
                out[VIEWS] = self.multicrop(image)
        if self.plain_crops:
            if deferred:
                pairs = [self.plain.crop_and_draws(image) for _ in range(self.plain_crops)]
                out[PLAIN_VIEWS], out[PLAIN_DRAWS] = [c for c, _ in pairs], [d for _, d in pairs]
            else:
                out[PLAIN_VIEWS] = [self.plain(image) for _ in range(self.plain_crops)]
        return out

    def boxes(self, image: Image.Image) -> dict[str, Any]:
        """crop_on=device: the image decoded once (uint8) and every crop's box and draws."""
        out: dict[str, Any] = {SOURCE: to_uint8_tensor(image)}
        if self.multicrop is not None:
            out[VIEW_BOXES], out[VIEW_DRAWS] = self.multicrop.boxes_and_draws(image)
        if self.plain_crops:
            pairs = [self.plain.box_and_draws(image) for _ in range(self.plain_crops)]
            out[PLAIN_BOXES], out[PLAIN_DRAWS] = [b for b, _ in pairs], [d for _, d in pairs]
        return out

    def device_augment(self, mean: Sequence[float], std: Sequence[float]) -> DeviceAugment | None:
        """What finishes these views on the device (None when the workers finish them)."""
        if self.augment_on != "device":
            return None
        views = self.multicrop.view_photometrics() if self.multicrop is not None else []
        sizes = self.multicrop.view_sizes() if self.multicrop is not None else []
        plain = self.plain.photometric if self.plain_crops else None
        plain_size = self.plain.size if self.plain_crops else None
        return DeviceAugment(views, plain, mean, std, sizes, plain_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(multicrop={self.multicrop}, plain={self.plain} x{self.plain_crops}, "
                f"augment_on={self.augment_on!r}, crop_on={self.crop_on!r})")
