"""data2vec 2.0 (Baevski et al., 2023) for images: the fast recipe of fairseq's `data2vec_multi`
(examples/data2vec/config/v2/base_images_only_task.yaml).

Where its speed comes from, each piece as the official code does it:
- inverse block masks drawn with the batch: 80% masked, the visible 20% in 3 x 3 blocks (39 of 196
  tokens), `clone_batch` = 16 independent masks per image (ssl/data/inverse_block_mask.py);
- the student encoder sees only the visible tokens plus CLS (MAE's token dropping); patches are
  embedded once per image and repeated per clone;
- a light convolutional decoder fills in the masked positions from the visible latents and
  Gaussian noise tokens (ssl/heads/data2vec2_decoder.py);
- the EMA teacher runs once per image on the unmasked crop, shared by its 16 masked copies.
Targets: the teacher's FFN outputs (before the residual) of its last `top_k` blocks, each
instance-normalised over tokens, averaged, then layer-normalised. Loss: L2 summed over channels
x 1/sqrt(D), mean over masked tokens, + 0.01 x the CLS loss summed over this device's clones
(ssl/losses/data2vec2.py). EMA 0.9998 -> 0.99999 linearly over 100k updates, eval mode, buffers
and frozen parameters copied. Fixed 2-D sin-cos positions, xavier patch embedding, CLS ~ N(0, 1).

Deviations (timm's ViT is the backbone, shared with every objective): pre-LN blocks with a final
norm where fairseq uses post-LN `AltBlock`s and an input LayerNorm; no prenet / main split (the
first 2 blocks are simply not target layers, as fairseq's 2 prenet blocks are not); the CLS slot of
timm's position table is zero instead of absent; Linear layers keep timm's truncated-normal(0.02)
init where fairseq draws a plain normal(0.02). The teacher runs in the step's precision, as
fairseq's `ema_same_dtype` (targets are normalised in float32).

From the command line: `python -m ssl.pretrain experiment=quickstart_data2vec2`. In Python, one
step's loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 3}}))
>>> d2v = Data2Vec2(vit, **recipe_settings("data2vec2", image_size=32, clone_batch=2))
>>> d2v.prepare_backbone(vit)  # fixed sin-cos positions, before the teacher copies the student
>>> batch = {PLAIN_VIEWS: [torch.rand(4, 3, 32, 32)]}
>>> for masker in d2v.batch_maskers():  # 2 inverse block masks per image, drawn with the batch
...     batch.update(masker(4, torch.Generator().manual_seed(0)))
>>> teacher = nn.ModuleDict({"backbone": copy.deepcopy(vit)})
>>> out = d2v.loss(batch, vit, teacher, StepContext())
>>> out.loss.isfinite().item()
True
>>> out.loss.backward()  # the training module then steps and moves the teacher by EMA
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.backbones.sincos import sincos_2d
from ssl.backbones.vit import ViTBackbone
from ssl.data.inverse_block_mask import InverseBlockMasker
from ssl.data.masking import gather_tokens
from ssl.data.spec import PLAIN_VIEWS, BatchMasker, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.heads.data2vec2_decoder import ConvDecoder2d, decoder_input
from ssl.losses.data2vec import data2vec_targets, masked_feature_std
from ssl.losses.data2vec2 import cls_loss, masked_token_loss
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext
from ssl.teacher import TeacherSpec

# fairseq's 2 prenet ("modality context encoder") blocks come before the target blocks.
PRENET_DEPTH = 2


def apply_data2vec2_encoder_init(backbone: ViTBackbone) -> None:
    """fairseq's image encoder: frozen 2-D sin-cos patch positions (the CLS slot zero), xavier-
    uniform patch embedding (as a matrix), CLS token ~ N(0, 1) (`init_extra_token_zero: false`)."""
    model = backbone.model
    weight = model.patch_embed.proj.weight
    nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token)
    if model.pos_embed is not None:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        model.pos_embed.data.copy_(sincos_2d(model.pos_embed.shape[-1], backbone.grid, prefix).unsqueeze(0))
        model.pos_embed.requires_grad_(False)


class Data2Vec2(Objective):
    name = "data2vec2"
    needs_teacher = True
    recipe_drop_path_rate = 0.0  # base config: no drop path, all dropouts 0

    def __init__(
        self,
        backbone: Backbone,
        *,
        image_size: int,
        top_k: int | None,
        loss_beta: float,
        cls_loss: float,
        mask_prob: float,
        mask_length: int,
        mask_prob_adjust: float,
        clone_batch: int,
        mask_noise_std: float,
        decoder: Mapping[str, Any],
        official_init: bool,
        crop_scale: tuple[float, float],
        teacher: Mapping[str, Any],
    ) -> None:
        """Settings and their defaults: conf/objective/data2vec2.yaml (`decoder`: dim, layers,
        kernel, groups; `teacher`: momentum, momentum_end, schedule, ramp_steps)."""
        super().__init__()
        self.check_backbone(backbone)
        depth = backbone.depth
        self.top_k = int(top_k) if top_k else max(1, depth - PRENET_DEPTH)
        if not 0 < self.top_k <= depth:
            raise IncompatibleConfigError(
                f"objective.data2vec2.top_k={top_k} but the backbone has {depth} blocks: use 1..{depth}"
            )
        self.loss_beta = float(loss_beta)
        self.cls_weight = float(cls_loss)
        if self.cls_weight > 0 and backbone.model.cls_token is None:
            raise IncompatibleConfigError(
                "objective.data2vec2.cls_loss > 0 needs a ViT with a CLS token; set cls_loss=0 or use one"
            )
        self.clone_batch = int(clone_batch)
        if self.clone_batch < 1:
            raise IncompatibleConfigError(f"objective.data2vec2.clone_batch must be >= 1, got {clone_batch}")
        if not 0.0 < float(mask_prob) < 1.0:
            raise IncompatibleConfigError(f"objective.data2vec2.mask_prob must be in (0, 1), got {mask_prob}")
        patch = backbone.patch_size
        if image_size % patch:
            raise IncompatibleConfigError(f"patch size {patch} does not divide image size {image_size}")
        self.grid = (image_size // patch, image_size // patch)
        try:
            self.masker = InverseBlockMasker(
                self.grid, self.name, mask_prob=mask_prob, mask_length=mask_length,
                mask_prob_adjust=mask_prob_adjust, copies=self.clone_batch,
            )
        except ValueError as error:
            raise IncompatibleConfigError(f"objective.data2vec2: {error}") from error
        self.visible = self.masker.visible
        self.mask_noise_std = float(mask_noise_std)
        self.official_init = bool(official_init)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        dim = backbone.embed_dim
        try:
            self.decoder = ConvDecoder2d(
                dim, int(decoder["dim"] or dim), int(decoder["layers"]), int(decoder["kernel"]),
                int(decoder["groups"]),
            )
        except ValueError as error:
            raise IncompatibleConfigError(f"objective.data2vec2.decoder: {error}") from error
        self._teacher = TeacherSpec(
            float(teacher["momentum"]), float(teacher["momentum_end"]), train_mode=False, buffers="copy",
            schedule=str(teacher["schedule"]), ramp_steps=int(teacher["ramp_steps"]),
        )

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        if not isinstance(backbone, ViTBackbone):
            raise IncompatibleConfigError(
                f"data2vec 2.0 needs a ViT backbone: its student encodes only the visible patch tokens "
                f"and regresses per-block token features, and '{backbone.timm_name}' is not a ViT. Use "
                "backbone=vit_t|vit_s|vit_b, or objective=mfm / objective=dino for CNNs."
            )

    def prepare_backbone(self, backbone: Backbone) -> None:
        if self.official_init:
            apply_data2vec2_encoder_init(backbone)

    def view_spec(self) -> ViewSpec:
        """RandomResizedCrop(0.2-1, bicubic) + flip, no colour jitter (fairseq MaeImageDataset)."""
        return ViewSpec(plain_crops=1, plain_crop_scale=self.crop_scale)

    def teacher_spec(self) -> TeacherSpec:
        return self._teacher

    def block_masker(self) -> InverseBlockMasker:
        """`clone_batch` inverse block masks per image, drawn in the collate step under this
        objective's keys."""
        return self.masker

    def batch_maskers(self) -> list[BatchMasker]:
        return [self.masker]

    def encode_visible(
        self, backbone: ViTBackbone, images: torch.Tensor, ids_shuffle: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The student encoder on each clone's visible tokens: [B * clones, prefix + visible, D]."""
        tokens, grid = backbone.patch_embed(images)
        if self.clone_batch > 1:
            tokens = tokens.repeat_interleave(self.clone_batch, dim=0)
        visible = gather_tokens(tokens, ids_shuffle[:, : self.visible])
        x, _ = backbone.run_blocks(backbone.add_prefix(visible))
        return x, grid

    def student_predictions(
        self, backbone: ViTBackbone, images: torch.Tensor, ids_shuffle: torch.Tensor,
        ids_restore: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder predictions [B * clones, L, D] and the CLS outputs [B * clones, D].

        Patches are embedded (with positions) once per image and repeated per clone; only the
        visible tokens and CLS go through the encoder.
        """
        x, grid = self.encode_visible(backbone, images, ids_shuffle)
        n_prefix = backbone.model.num_prefix_tokens
        full = decoder_input(x[:, n_prefix:], ids_restore, self.mask_noise_std)
        return self.decoder(full, grid), x[:, 0]

    @torch.no_grad()
    def teacher_targets(self, teacher_backbone: ViTBackbone, images: torch.Tensor) -> torch.Tensor:
        """Targets [B, L, D] (float32) from one teacher pass over the unmasked images."""
        tokens, _ = teacher_backbone.patch_embed(images)
        ffn = teacher_backbone.block_ffn_outputs(teacher_backbone.add_prefix(tokens))
        return data2vec_targets(ffn, self.top_k, "instance", final_layer_norm=True)

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        images = batch[PLAIN_VIEWS][0]
        keys = self.masker
        mask = batch[keys.mask_key].bool()
        targets = self.teacher_targets(teacher["backbone"], images)
        pred, cls = self.student_predictions(
            backbone, images, batch[keys.ids_shuffle_key], batch[keys.ids_restore_key]
        )
        token_targets = targets.repeat_interleave(self.clone_batch, dim=0)
        regression = masked_token_loss(pred, token_targets, mask, self.loss_beta)
        loss = regression
        metrics = {"regression": regression.detach()}
        if self.cls_weight > 0:
            cls_target = targets.mean(dim=1).repeat_interleave(self.clone_batch, dim=0)
            cls_term = cls_loss(cls, cls_target, self.cls_weight, self.loss_beta)
            loss = loss + cls_term
            metrics["cls"] = cls_term.detach()
        with torch.no_grad():
            metrics["target_std"] = masked_feature_std(token_targets, mask)
            metrics["pred_std"] = masked_feature_std(pred, mask)
        return ObjectiveOutput(loss, metrics)
