"""data2vec (Baevski et al., 2022) for vision: predict the EMA teacher's contextualised features
at masked positions.

Defaults follow the data2vec 1.0 vision recipe (facebookresearch/data2vec_vision, BEiT code,
README ViT-B command): BEiT block masks (~61%) drawn with the batch, a learned mask token blended
in before the position embedding, a linear regression head on the student's final-norm output at
masked positions; the teacher is the shared EMA teacher, always in eval mode, run on the unmasked
image without gradients and in float32; targets are its top-K block outputs (after the residual,
before the final norm), each layer-normalised without parameters, averaged, then layer-normalised
again; Smooth-L1 (beta 2) averaged over all masked elements; constant EMA 0.9998.

data2vec 2.0 options on the same machinery: instance-norm targets, a linear EMA ramp, and
several masks per image sharing one teacher pass (`clone_batch`).

From the command line: `python -m ssl.pretrain experiment=quickstart_data2vec`. In Python, one step's
loss on a tiny ViT:

>>> import copy, torch
>>> from omegaconf import OmegaConf
>>> from ssl.backbones.factory import build_backbone
>>> from ssl.objectives import recipe_settings
>>> vit = build_backbone(OmegaConf.create(
...     {"name": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "kwargs": {"depth": 2}}))
>>> d2v = Data2Vec(vit, **recipe_settings("data2vec", image_size=32))
>>> batch = {PLAIN_VIEWS: [torch.rand(4, 3, 32, 32)]}
>>> for masker in d2v.batch_maskers():  # BEiT block masks, drawn with the batch
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
from ssl.backbones.vit import ViTBackbone
from ssl.data.masking import BlockMasker, BlockMaskGenerator
from ssl.data.spec import PLAIN_VIEWS, BatchMasker, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.losses.data2vec import data2vec_targets, masked_feature_std, masked_regression_loss
from ssl.objectives.base import Objective, ObjectiveOutput, StepContext
from ssl.teacher import TeacherSpec

# The official target layers: the last 6 blocks (6-11 of ViT-B, 18-23 of ViT-L).
DEFAULT_TOP_K = 6


class Data2Vec(Objective):
    name = "data2vec"
    needs_teacher = True
    recipe_drop_path_rate = 0.25  # README ViT-B; the teacher runs without it

    def __init__(
        self,
        backbone: Backbone,
        *,
        image_size: int,
        top_k: int | None,
        target_norm: str,
        final_layer_norm: bool,
        loss_beta: float,
        mask_fraction: float | None,
        clone_batch: int,
        teacher: Mapping[str, Any],
        crop_scale: tuple[float, float],
        color_jitter: float,
    ) -> None:
        """Settings and their defaults: conf/objective/data2vec.yaml (`teacher`: momentum,
        momentum_end, schedule, ramp_steps; always eval mode, buffers copied)."""
        super().__init__()
        self.check_backbone(backbone)
        depth = backbone.depth
        self.top_k = int(top_k) if top_k else min(DEFAULT_TOP_K, depth)
        if not 0 < self.top_k <= depth:
            raise IncompatibleConfigError(
                f"objective.data2vec.top_k={top_k} but the backbone has {depth} blocks: use 1..{depth}"
            )
        self.target_norm = target_norm
        self.final_layer_norm = final_layer_norm
        self.loss_beta = float(loss_beta)
        self.clone_batch = int(clone_batch)
        if self.clone_batch < 1:
            raise IncompatibleConfigError(f"objective.data2vec.clone_batch must be >= 1, got {clone_batch}")
        patch = backbone.patch_size
        if image_size % patch:
            raise IncompatibleConfigError(f"patch size {patch} does not divide image size {image_size}")
        self.grid = (image_size // patch, image_size // patch)
        if mask_fraction is not None and not 0.0 < float(mask_fraction) < 1.0:
            raise IncompatibleConfigError(
                f"objective.data2vec.mask_fraction must be in (0, 1), got {mask_fraction} "
                "(null: BEiT's 120 of 196 patches)"
            )
        self.mask_generator = BlockMaskGenerator.scaled(self.grid, mask_fraction)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.color_jitter = float(color_jitter)
        dim = backbone.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.head = nn.Linear(dim, dim)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self._teacher = TeacherSpec(
            float(teacher["momentum"]), float(teacher["momentum_end"]), train_mode=False, buffers="copy",
            schedule=str(teacher["schedule"]), ramp_steps=int(teacher["ramp_steps"]),
        )

    @classmethod
    def check_backbone(cls, backbone: Backbone) -> None:
        if not isinstance(backbone, ViTBackbone):
            raise IncompatibleConfigError(
                f"data2vec needs a ViT backbone: it puts a mask token at masked patch positions and "
                f"regresses per-block token features, and '{backbone.timm_name}' is not a ViT. Use "
                "backbone=vit_t|vit_s|vit_b, or objective=mfm / objective=dino for CNNs."
            )

    def view_spec(self) -> ViewSpec:
        return ViewSpec(plain_crops=1, plain_crop_scale=self.crop_scale, plain_color_jitter=self.color_jitter)

    def teacher_spec(self) -> TeacherSpec:
        return self._teacher

    def block_masker(self) -> BlockMasker:
        """`clone_batch` block masks per image, drawn in the collate step under this objective's key."""
        return BlockMasker(self.mask_generator, prefix=self.name, copies=self.clone_batch)

    def batch_maskers(self) -> list[BatchMasker]:
        return [self.block_masker()]

    def no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """As the BEiT code: biases and 1-D tensors exempt; the mask token is decayed."""
        return param.ndim < 2 or name.endswith(".bias")

    def backbone_no_weight_decay(self, name: str, param: nn.Parameter) -> bool:
        """The BEiT encoder's no_weight_decay list: pos_embed and cls_token."""
        return name.endswith(("pos_embed", "cls_token"))

    def student_predictions(
        self, backbone: ViTBackbone, images: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Mask token at masked positions (before positions are added), encode, regress: [B, L, D].

        Every patch is regressed and the loss keeps the masked ones: selecting them first would size
        the head's input from the mask, a host sync on GPUs, to save one linear layer's work.
        """
        tokens, grid = backbone.embed_patches(images)
        weight = mask.unsqueeze(-1).to(tokens.dtype)
        tokens = tokens * (1 - weight) + self.mask_token.to(tokens.dtype) * weight
        x, _ = backbone.run_blocks(backbone.add_prefix(backbone.add_position(tokens, grid)))
        patches = x[:, backbone.model.num_prefix_tokens :]
        return self.head(patches)

    @torch.no_grad()
    def teacher_targets(self, teacher_backbone: ViTBackbone, images: torch.Tensor) -> torch.Tensor:
        """Targets [B, L, D] from one float32 teacher pass over the unmasked images."""
        with torch.autocast(device_type=images.device.type, enabled=False):
            tokens, _ = teacher_backbone.patch_embed(images.float())
            _, blocks = teacher_backbone.run_blocks(teacher_backbone.add_prefix(tokens), return_blocks=True)
            return data2vec_targets(blocks, self.top_k, self.target_norm, self.final_layer_norm)

    def loss(
        self,
        batch: Mapping[str, Any],
        backbone: Backbone,
        teacher: nn.ModuleDict | None,
        ctx: StepContext,
    ) -> ObjectiveOutput:
        images = batch[PLAIN_VIEWS][0]
        mask = batch[self.block_masker().mask_key].bool()
        targets = self.teacher_targets(teacher["backbone"], images)
        if self.clone_batch > 1:
            images = images.repeat_interleave(self.clone_batch, dim=0)
            targets = targets.repeat_interleave(self.clone_batch, dim=0)
        pred = self.student_predictions(backbone, images, mask)
        loss = masked_regression_loss(pred, targets, mask, self.loss_beta)
        with torch.no_grad():
            metrics = {
                "target_std": masked_feature_std(targets, mask),
                "pred_std": masked_feature_std(pred, mask),
                "masked_fraction": mask.float().mean(),
            }
        return ObjectiveOutput(loss, metrics)
