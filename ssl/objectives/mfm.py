"""MFM (Xie et al., 2023): recover the frequencies a low- or high-pass filter removed.

Faithful to Jiahao000/MFM: each image is randomly low-pass or high-pass filtered at a fixed
radius (masks drawn with the batch, ssl/data/frequency.py), the corruption runs in float32 FFTs
outside autocast on [0, 1] pixels and is clamped before normalisation, the *whole* corrupted
image is encoded (no mask token), a 1x1 convolution + PixelShuffle at the encoder's stride
predicts the full image, and the loss is the spectrum distance on the removed frequencies only,
averaged over the removed (image, frequency) pairs of the batch. Works for ViTs (patch tokens as
a grid) and CNNs (last feature map).

From the command line: `python -m ssl.pretrain experiment=quickstart_mfm`. In Python, one step's
loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> mfm = MFM(vit, **recipe_settings("mfm", image_size=32, mean=[0.5] * 3, std=[0.25] * 3))
>>> batch = {PLAIN_VIEWS: [torch.rand(4, 3, 32, 32)]}
>>> for masker in mfm.batch_maskers():  # low- or high-pass per image, drawn with the batch
...     batch.update(masker(4, torch.Generator().manual_seed(0)))
>>> out = mfm.loss(batch, vit, None, StepContext())
>>> out.loss.isfinite().item()
True
>>> out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.data.frequency import FrequencyMasker, frequency_corrupt, scaled_radius
from ssl.data.spec import PLAIN_VIEWS, BatchMasker, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.pixel_shuffle import PixelShuffleHead
from ssl.losses.mfm import FocalWeighting, mfm_loss
from ssl.objectives.base import Objective, ObjectiveOutput, Reconstruction, StepContext

# Probability of a low-pass (rather than high-pass) mask in the released configs.
LOWPASS_PROB_VIT = 0.5
LOWPASS_PROB_CNN = 0.3


class MFM(Objective):
    name = "mfm"
    needs_teacher = False

    def __init__(
        self,
        backbone: Backbone,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        radius: float | None,
        lowpass_prob: float | None,
        loss_gamma: float,
        focal: Mapping[str, Any],
        crop_scale: tuple[float, float],
    ) -> None:
        """Settings and their defaults: conf/objective/mfm.yaml (`focal`: enabled, matrix_gamma,
        log_matrix, batch_matrix)."""
        super().__init__()
        self.image_size = int(image_size)
        self.radius = float(radius) if radius is not None else scaled_radius(self.image_size)
        if lowpass_prob is None:
            lowpass_prob = LOWPASS_PROB_VIT if backbone.is_vit else LOWPASS_PROB_CNN
        if not 0.0 <= float(lowpass_prob) <= 1.0:
            raise IncompatibleConfigError(
                f"objective.mfm.lowpass_prob is a probability, got {lowpass_prob}: use a value in [0, 1]"
            )
        self.lowpass_prob = float(lowpass_prob)
        self.loss_gamma = float(loss_gamma)
        self.focal = (
            FocalWeighting(focal["matrix_gamma"], focal["log_matrix"], focal["batch_matrix"])
            if focal["enabled"] else None
        )
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.stride = backbone.output_stride()
        self.head = PixelShuffleHead(backbone.embed_dim, self.stride)
        as_column = lambda values: torch.tensor([float(v) for v in values]).view(1, 3, 1, 1)  # noqa: E731
        self.register_buffer("mean", as_column(mean), persistent=False)
        self.register_buffer("std", as_column(std), persistent=False)
        keep_key = f"{self.name}_keep"
        self.masker = FrequencyMasker(self.image_size, self.radius, self.lowpass_prob, key=keep_key)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(plain_crops=1, plain_crop_scale=self.crop_scale)

    def batch_maskers(self) -> list[BatchMasker]:
        return [self.masker]

    def backbone_no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """MFM's encoder exempts its position embedding and CLS token from weight decay."""
        return name.endswith(("pos_embed", "cls_token"))

    def corrupt(self, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Normalised images -> [0, 1] pixels -> frequency filter (fp32 FFT) -> clamp -> normalised."""
        pixels = images.float() * self.std + self.mean
        return (frequency_corrupt(pixels, keep) - self.mean) / self.std

    def predict(self, backbone: Backbone, corrupted: torch.Tensor) -> torch.Tensor:
        """Encode the whole corrupted image; the head predicts the full image [B, 3, H, W]."""
        features = backbone.forward_features(corrupted)
        b, _, dim = features.patch_tokens.shape
        h, w = features.grid
        feature_map = features.patch_tokens.transpose(1, 2).reshape(b, dim, h, w)
        pred = self.head(feature_map)
        # A CNN grid can overhang the image (28 px / stride 8 -> 4 x 4 cells): crop to the image.
        return pred[..., : corrupted.shape[-2], : corrupted.shape[-1]]

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        images = batch[PLAIN_VIEWS][0]
        keep = batch[self.masker.key]
        pred = self.predict(backbone, self.corrupt(images, keep))
        loss = mfm_loss(pred, images, keep, self.loss_gamma, self.focal)
        return ObjectiveOutput(loss, {"lowpass_fraction": keep.flatten(1).mean(1).lt(0.5).float().mean()})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, backbone: Backbone) -> Reconstruction:
        """Filtered input and the predicted image (low- and high-pass alternate from a fixed seed)."""
        generator = torch.Generator().manual_seed(0)
        masker = FrequencyMasker(tuple(images.shape[-2:]), self.radius, self.lowpass_prob)
        keep = masker(images.shape[0], generator)[masker.key].to(images.device)
        corrupted = self.corrupt(images, keep)
        return Reconstruction(images, corrupted, self.predict(backbone, corrupted).float())
