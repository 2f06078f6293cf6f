"""RandomResizedCrop + flip on the training device, in batch (`data.crop_on=device`).

For datasets whose images all share one size (CIFAR, STL-10, Fashion-MNIST, a pre-resized
folder), the workers can ship each decoded image once, as uint8, with one box per crop
(x1, y1, x2, y2, flip) drawn exactly as torchvision's RandomResizedCrop and RandomHorizontalFlip
draw them; the device then cuts and resizes every crop of a kind in one `roi_align` call. Images
of different sizes cannot be batched before cropping, so such datasets keep the crops in the
workers (`data.crop_on=worker`, the default) and can still move the photometric half to the
device (`data.augment_on=device`).

Resampling: `roi_align` averages ceil(crop / output) bilinear samples per output pixel in each
direction (aligned pixel centres), an area-like filter when shrinking and bilinear when
enlarging, where the worker path uses PIL's bicubic. The crops agree in content and geometry,
not bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.ops import roi_align

# Batch keys: the decoded image, and the boxes of the multi-crop and plain views.
SOURCE, VIEW_BOXES, PLAIN_BOXES = "source_image", "view_boxes", "plain_view_boxes"
CROP_ON = ("worker", "device")
FLIP = 4  # the box column that holds the flip flag
RATIO = (3.0 / 4.0, 4.0 / 3.0)  # RandomResizedCrop's default aspect-ratio range


def draw_box(image: Image.Image, scale: Sequence[float], ratio: Sequence[float] = RATIO) -> torch.Tensor:
    """(x1, y1, x2, y2, flip) of one crop, from torch's generator in the order the worker path
    draws them: RandomResizedCrop's parameters, then the horizontal flip (p = 0.5)."""
    top, left, height, width = T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
    flip = float(torch.rand(1) < 0.5)
    return torch.tensor([left, top, left + width, top + height, flip], dtype=torch.float32)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, size, size) crops of float `images` (N, C, H, W), one box row per image."""
    index = torch.arange(len(images), device=images.device, dtype=images.dtype).unsqueeze(1)
    rois = torch.cat([index, boxes[:, :FLIP].to(images.dtype)], dim=1)
    crops = roi_align(images, rois, output_size=(size, size), spatial_scale=1.0,
                      sampling_ratio=-1, aligned=True)
    flipped = boxes[:, FLIP].view(-1, 1, 1, 1) > 0.5
    return torch.where(flipped, crops.flip(-1), crops)


def check_one_size(images: Sequence[torch.Tensor]) -> None:
    """The decoded images of one batch must share a size to travel as one tensor."""
    sizes = sorted({tuple(image.shape[-2:]) for image in images})
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w}" for h, w in sizes[:4])
        raise ValueError(
            f"data.crop_on=device needs images of one size, but this batch holds {shown} (H x W). "
            "Use data.crop_on=worker (crops in the data workers; data.augment_on=device still moves "
            "the colour augmentations to the GPU), or resize the dataset's images to one size first."
        )
