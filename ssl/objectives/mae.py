"""MAE (He et al., 2022): reconstruct the pixels of randomly masked patches from the visible ones.

Faithful to facebookresearch/mae: per-sample random masking by sorting noise (drawn with the
batch, see ssl/data/masking.py); the encoder runs on the visible tokens only (plus CLS), which is
where MAE's speed comes from; a light decoder with mask tokens and fixed 2-D sin-cos positions
predicts every patch; the loss is the MSE on removed patches, per-patch normalised targets
(`norm_pix_loss`) by default as in the paper. With `official_init` the encoder gets MAE's fixed
sin-cos position embedding and xavier initialisation.

From the command line: `python -m ssl.pretrain experiment=quickstart_mae`. In Python, one step's
loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> mae = MAE(vit, **recipe_settings("mae", image_size=32))
>>> batch = {PLAIN_VIEWS: [torch.rand(4, 3, 32, 32)]}
>>> for masker in mae.batch_maskers():  # the data layer draws the masks with the batch
...     batch.update(masker(4, torch.Generator().manual_seed(0)))
>>> out = mae.loss(batch, vit, None, StepContext())
>>> out.loss.isfinite().item()
True
>>> out.loss.backward()
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.sincos import sincos_2d
from ssl.backbones.vit import ViTBackbone
from ssl.data.masking import RandomTokenMasker, gather_tokens, random_token_mask, visible_token_count
from ssl.data.spec import PLAIN_VIEWS, BatchMasker, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.mae_decoder import MAEDecoder, xavier_init
from ssl.losses.mae import mae_loss, patchify, unpatchify
from ssl.objectives.base import Objective, ObjectiveOutput, Reconstruction, StepContext

# Official decoder (ViT-B/L/H): 512 wide, 8 blocks, 16 heads. Below SMALL_IMAGE px (CIFAR,
# Fashion-MNIST) a decoder that size would cost several times the encoder; ours is smaller.
OFFICIAL_DECODER = (512, 8, 16)
SMALL_IMAGE_DECODER = (256, 4, 8)
SMALL_IMAGE = 112


def default_decoder(image_size: int) -> tuple[int, int, int]:
    return OFFICIAL_DECODER if image_size >= SMALL_IMAGE else SMALL_IMAGE_DECODER


def apply_mae_encoder_init(backbone: ViTBackbone) -> None:
    """MAE's encoder: frozen 2-D sin-cos positions (zero CLS slot), xavier Linear, N(0, .02) tokens."""
    model = backbone.model
    model.apply(xavier_init)
    weight = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    for name in ("cls_token", "reg_token"):
        token = getattr(model, name, None)
        if token is not None:
            nn.init.normal_(token, std=0.02)
    if model.pos_embed is not None:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        table = sincos_2d(model.pos_embed.shape[-1], backbone.grid, prefix)
        model.pos_embed.data.copy_(table.unsqueeze(0))
        model.pos_embed.requires_grad_(False)


class MAE(Objective):
    name = "mae"
    needs_teacher = False

    def __init__(
        self,
        backbone: Backbone,
        *,
        image_size: int,
        mask_ratio: float,
        norm_pix_loss: bool,
        decoder_dim: int | None,
        decoder_depth: int | None,
        decoder_heads: int | None,
        mlp_ratio: float,
        official_init: bool,
        crop_scale: tuple[float, float],
    ) -> None:
        """Settings and their defaults: conf/objective/mae.yaml."""
        super().__init__()
        self.check_backbone(backbone)
        self.patch_size = backbone.patch_size
        self.image_size = int(image_size)
        if self.image_size % self.patch_size:
            raise IncompatibleConfigError(
                f"patch size {self.patch_size} does not divide image size {self.image_size}"
            )
        self.grid = (self.image_size // self.patch_size,) * 2
        self.num_tokens = self.grid[0] * self.grid[1]
        self.mask_ratio = float(mask_ratio)
        self.keep = visible_token_count(self.num_tokens, self.mask_ratio)
        self.norm_pix_loss = norm_pix_loss
        self.official_init = official_init
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        dim, depth, heads = default_decoder(self.image_size)
        self.decoder = MAEDecoder(
            backbone.embed_dim, self.patch_size, decoder_dim or dim, decoder_depth or depth,
            decoder_heads or heads, mlp_ratio,
        )

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        if not isinstance(backbone, ViTBackbone):
            raise IncompatibleConfigError(
                f"MAE needs a ViT backbone: it drops masked patch tokens before the encoder, and "
                f"'{backbone.timm_name}' is not a ViT. Use backbone=vit_t|vit_s|vit_b, or "
                "objective=mfm (masked frequency modeling works with ResNets)."
            )

    def prepare_backbone(self, backbone: Backbone) -> None:
        if self.official_init:
            apply_mae_encoder_init(backbone)

    def view_spec(self) -> ViewSpec:
        return ViewSpec(plain_crops=1, plain_crop_scale=self.crop_scale)

    def sharded_blocks(self) -> list[nn.Module]:
        """The decoder's transformer blocks (ViT-B's decoder: 25M parameters) shard under FSDP."""
        return list(self.decoder.blocks)

    def token_masker(self) -> RandomTokenMasker:
        """The per-sample random masks of a batch, drawn in the collate step under this objective's keys."""
        return RandomTokenMasker(self.num_tokens, self.mask_ratio, prefix=self.name)

    def batch_maskers(self) -> list[BatchMasker]:
        return [self.token_masker()]

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """As MAE's timm `add_weight_decay`: biases and 1-D tensors only; the mask token decays."""
        return param.ndim < 2 or name.endswith(".bias")

    def encode_visible(
        self, backbone: ViTBackbone, images: torch.Tensor, ids_shuffle: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encoder on the visible tokens only: [B, prefix + keep, D] and the full token grid."""
        tokens, grid = backbone.patch_embed(images)
        keep = visible_token_count(tokens.shape[1], self.mask_ratio)
        visible = gather_tokens(tokens, ids_shuffle[:, :keep])
        latent, _ = backbone.run_blocks(backbone.add_prefix(visible))
        return latent, grid

    def predict(
        self, backbone: ViTBackbone, images: torch.Tensor, ids_shuffle: torch.Tensor,
        ids_restore: torch.Tensor,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        latent, grid = self.encode_visible(backbone, images, ids_shuffle)
        return self.decoder(latent, ids_restore, grid, backbone.model.num_prefix_tokens), grid

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        images = batch[PLAIN_VIEWS][0]
        keys = self.token_masker()
        pred, _ = self.predict(backbone, images, batch[keys.ids_shuffle_key], batch[keys.ids_restore_key])
        target = patchify(images, self.patch_size)
        loss = mae_loss(pred, target, batch[keys.mask_key], self.norm_pix_loss)
        return ObjectiveOutput(loss, {})

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, backbone: Backbone) -> Reconstruction:
        """Masked input (removed patches at the dataset mean) and the prediction pasted into it.

        With norm_pix_loss the prediction is per-patch normalised; it is shown with each
        patch's true mean and spread, as MAE's visualisation does.
        """
        generator = torch.Generator().manual_seed(0)
        _, _, h, w = images.shape
        num_tokens = (h // self.patch_size) * (w // self.patch_size)
        drawn = random_token_mask(images.shape[0], num_tokens, self.mask_ratio, generator)
        ids_shuffle, ids_restore, mask = (t.to(images.device) for t in
                                          (drawn.ids_shuffle, drawn.ids_restore, drawn.mask))
        pred, grid = self.predict(backbone, images, ids_shuffle, ids_restore)
        target = patchify(images, self.patch_size)
        pred = pred.float()
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            std = (target.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        removed = mask.unsqueeze(-1)
        corrupted = unpatchify(target * (1 - removed), self.patch_size, grid)
        pasted = unpatchify(target * (1 - removed) + pred * removed, self.patch_size, grid)
        return Reconstruction(images, corrupted, pasted)

