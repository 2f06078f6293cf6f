"""Plain crops: the masked-image-modeling augmentation (RandomResizedCrop + flip, optional jitter)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ssl.data.device_crops import draw_box
from ssl.data.photometric import Photometric
from ssl.data.pil_ops import IMAGENET_MEAN, IMAGENET_STD, ToNormalizedTensor, to_uint8_tensor


class PlainCropTransform:
    """The masked-image-modeling augmentation: RandomResizedCrop + flip only.

    RandomResizedCrop(size, scale, bicubic) -> horizontal flip (p=0.5) -> normalise. With
    `color_jitter` j > 0 (BEiT's pipeline), ColorJitter(j, j, j), always applied, goes in front.
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        color_jitter: float = 0.0,
    ) -> None:
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.color_jitter = float(color_jitter)
        jitter = [T.ColorJitter(color_jitter, color_jitter, color_jitter)] if color_jitter else []
        self.geometric = T.Compose([
            T.RandomResizedCrop(self.size, scale=self.scale, interpolation=InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
        ])
        self.pipeline = T.Compose([*jitter, *self.geometric.transforms, ToNormalizedTensor(mean, std)])
        # On the device the jitter (always applied) follows the crop: the contrast blend then uses
        # the crop's mean luma instead of the whole image's, the only difference.
        j = self.color_jitter
        self.photometric = Photometric((j, j, j, 0.0), 1.0 if j else 0.0)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.pipeline(image)

    def crop_and_draws(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """data.augment_on=device: the uint8 crop and its photometric draws."""
        return to_uint8_tensor(self.geometric(image)), self.photometric.draw()

    def box_and_draws(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        """data.crop_on=device: the crop's box (x1, y1, x2, y2, flip) and its photometric draws."""
        return draw_box(image, self.scale), self.photometric.draw()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, scale={self.scale}, jitter={self.color_jitter})"
