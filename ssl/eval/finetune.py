"""`python -m ssl.eval.finetune`: full fine-tuning top-1 / top-5 of a checkpoint, export or baseline.

The MAE / BEiT fine-tuning recipe: the whole backbone plus a linear head on the mean of the patch
tokens (or the global vector) is trained with AdamW, layer-wise lr decay (ssl/eval/layer_decay.py),
stochastic depth (timm's drop_path_rate, set in the rebuilt timm model), a linear warm-up then a
per-step cosine (ssl/optim/schedules.py), label smoothing, mixup / cutmix (timm.data.Mixup with
SoftTargetCrossEntropy), RandAugment and random erasing (timm's create_transform); base lr x
batch / 256. Each piece is switched off in conf/eval/finetune.yaml. `labelled_fraction=0.01`
(or `labelled_per_class`, `labelled_file`) fine-tunes on a seeded per-class subset of train,
recorded in the result; the test split (clean images) stays whole. `backbone=<name>` without a
checkpoint is the supervised-from-scratch baseline.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from ssl.backbones.base import Backbone
from ssl.backbones.factory import build_backbone
from ssl.config import CONFIG_DIR
from ssl.data.datamodule import TransformedDataset, clean_loader, collate_readable
from ssl.eval.cli import labelled_line, run_command
from ssl.eval.encoder import eval_device, labelled_splits, resolve_backbone
from ssl.eval.labelled import labelled_train_split, pool_indices
from ssl.eval.layer_decay import layer_ids, param_groups_lrd
from ssl.eval.metrics import topk_accuracy
from ssl.optim.schedules import cosine_schedule

POOLS = ("avgpool", "global")
# timm arguments `build_backbone` sets itself from a backbone config (or that fine-tuning replaces).
OWN_TIMM_KWARGS = ("num_classes", "img_size", "patch_size", "dynamic_img_size", "drop_path_rate")


def trainable_backbone(backbone: Backbone, drop_path_rate: float) -> Backbone:
    """The same backbone (timm model, arguments, small-image stem, weights) rebuilt with stochastic depth.

    timm sets drop path when it builds a model (per-block rates rising to `drop_path_rate`), so
    the model a checkpoint or export was loaded into is rebuilt through `build_backbone` from its
    own timm name and arguments, and the weights copied over (drop path has no parameters).
    """
    kwargs = dict(backbone.timm_kwargs)
    spec = {
        "name": backbone.timm_name,
        "img_size": kwargs.get("img_size", 224),  # ViTs only; CNNs state the stem explicitly
        "patch_size": kwargs.get("patch_size", 16),
        "drop_path_rate": float(drop_path_rate) or None,  # 0: not passed (not every timm model takes it)
        "small_image_stem": bool(getattr(backbone, "small_image_stem", False)),
        "kwargs": {k: v for k, v in kwargs.items() if k not in OWN_TIMM_KWARGS},
    }
    rebuilt = build_backbone(OmegaConf.create(spec))
    rebuilt.load_state_dict(backbone.state_dict())
    rebuilt.weights_source = getattr(backbone, "weights_source", None)
    return rebuilt


class FineTuneClassifier(nn.Module):
    """A backbone and a linear head on its pooled features (`avgpool`: patch tokens, `global`)."""

    def __init__(self, backbone: Backbone, num_classes: int, pool: str, head_init_std: float) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"unknown finetune.pool '{pool}'; valid: {', '.join(POOLS)}")
        self.backbone, self.pool = backbone, pool
        self.head = nn.Linear(backbone.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)  # MAE: a near-zero start
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone.forward_features(images)
        pooled = features.global_vector if self.pool == "global" else features.patch_tokens.mean(dim=1)
        return self.head(pooled)


def classifier_param_groups(model: FineTuneClassifier, settings: DictConfig) -> tuple[list[dict], int]:
    """AdamW groups with layer-wise lr scales (the head is the top layer); and the number of layers."""
    timm_model = model.backbone.model
    ids, num_layers = layer_ids(timm_model, model.backbone.is_vit)
    prefix = "backbone.model."
    named_ids = {prefix + name: layer for name, layer in ids.items()}
    named_ids.update({f"head.{name}": num_layers + 1 for name, _ in model.head.named_parameters()})
    no_decay = getattr(timm_model, "no_weight_decay", lambda: set())()
    groups = param_groups_lrd(
        model.named_parameters(), named_ids, num_layers, settings.weight_decay, settings.layer_decay,
        no_weight_decay={prefix + name for name in no_decay},
    )
    return groups, num_layers


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, with 0 bits giving a black image as Pillow < 13 did (13 raises instead)."""
    from timm.data.auto_augment import posterize

    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return posterize(img, bits_to_keep, **kwargs)


def allow_zero_bit_posterize(transform: Any) -> Any:
    """timm's RandAugment `inc1` posterize keeps 4 - int(0.4 m) bits: 0 at magnitude 10, which
    m9 + magnitude noise reaches a few % of the time; give this transform's ops `posterize_any_bits`."""
    from timm.data.auto_augment import posterize

    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = posterize_any_bits
    return transform


def train_transform(dataset_cfg: DictConfig, augment: DictConfig) -> Any:
    """timm's training transform: random resized crop, flip, RandAugment, random erasing (MAE's)."""
    from timm.data import create_transform

    return allow_zero_bit_posterize(create_transform(
        input_size=int(dataset_cfg.image_size), is_training=True, scale=tuple(augment.crop_scale),
        hflip=float(augment.hflip), color_jitter=None, auto_augment=augment.rand_augment,
        interpolation="bicubic", mean=tuple(dataset_cfg.mean), std=tuple(dataset_cfg.std),
        re_prob=float(augment.reprob), re_mode="pixel", re_count=1,
    ))


def mixup_and_loss(settings: DictConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """(timm Mixup or None, the loss): soft-target cross-entropy under mixup / cutmix, else smoothed CE."""
    if settings.mixup > 0 or settings.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(
            mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, prob=settings.mixup_prob,
            switch_prob=settings.mixup_switch_prob, mode="batch", label_smoothing=settings.label_smoothing,
            num_classes=num_classes,
        )
        return mixup, SoftTargetCrossEntropy()
    return None, nn.CrossEntropyLoss(label_smoothing=settings.label_smoothing)


@torch.no_grad()
def test_accuracy(
    model: nn.Module, test_data: Any, dataset_cfg: DictConfig, cfg: DictConfig, device: torch.device
) -> dict[str, Any]:
    """Top-1 / top-5 and the number of clean test images (the transform k-NN and the linear probe use)."""
    model.eval()
    scores, labels = [], []
    loader = clean_loader(test_data, dataset_cfg, cfg.batch_size, cfg.num_workers,
                          max_samples=cfg.max_test_samples)
    for batch in loader:
        with autocast(cfg, device):
            scores.append(model(batch["image"].to(device)).float())
        labels.append(batch["label"].to(device))
    labels = torch.cat(labels)
    return {**topk_accuracy(torch.cat(scores), labels), "test_size": len(labels)}


def autocast(cfg: DictConfig, device: torch.device) -> Any:
    """bf16 autocast on CUDA when `finetune.amp`; full precision on CPU."""
    enabled = bool(cfg.finetune.amp) and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Fine-tune the configured backbone on (a labelled subset of) train; score it on test."""
    settings = cfg.finetune
    torch.manual_seed(cfg.seed)  # the random-init baseline: the same init as k-NN / linear
    loaded, dataset_cfg, what = resolve_backbone(cfg)
    device = eval_device(cfg)
    splits = labelled_splits(dataset_cfg, "fine-tuning")
    train_data, test_data = splits["train"], splits["test"]
    subset, labelled = labelled_train_split(cfg, train_data)
    indices = subset.indices if subset is not None else pool_indices(len(train_data), cfg.max_train_samples)
    num_classes = int(train_data.num_classes)  # every built dataset says (an image folder: its classes)

    torch.manual_seed(cfg.seed)
    backbone = trainable_backbone(loaded, settings.drop_path_rate)
    model = FineTuneClassifier(backbone, num_classes, settings.pool, settings.head_init_std).to(device)
    groups, num_layers = classifier_param_groups(model, settings)
    mixup, criterion = mixup_and_loss(settings, num_classes)
    batch_size = min(int(settings.batch_size), len(indices))
    if mixup is not None:
        batch_size -= batch_size % 2  # timm's batch mixup pairs each image with its mirror in the batch
    if batch_size < 1 or (mixup is not None and batch_size < 2):
        raise ValueError(f"{len(indices)} training images are too few to fine-tune on")
    generator = torch.Generator().manual_seed(int(cfg.seed))
    data = TransformedDataset(train_data, train_transform(dataset_cfg, settings.augment), "image",
                              on_unreadable="drop")
    loader = DataLoader(Subset(data, [int(i) for i in indices]), batch_size=batch_size, shuffle=True,
                        num_workers=cfg.num_workers, generator=generator, drop_last=True,
                        collate_fn=collate_readable)
    steps_per_epoch = len(loader)
    total_steps = int(settings.epochs) * steps_per_epoch
    lr = float(settings.base_lr) * batch_size / 256
    schedule = cosine_schedule(lr, float(settings.min_lr), total_steps,
                               int(round(settings.warmup_epochs * steps_per_epoch)))
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(settings.betas))

    start = time.perf_counter()
    step, loss_sum, loss_count = 0, 0.0, 0
    for _ in range(int(settings.epochs)):
        model.train()
        for batch in loader:
            if "image" not in batch or step >= total_steps:  # no image of the batch was readable
                continue
            images, targets = batch["image"].to(device), batch["label"].to(device)
            if mixup is not None and len(images) % 2:  # an unreadable image left the batch odd
                images, targets = images[:-1], targets[:-1]
            if len(images) == 0:
                continue
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step]) * group["lr_scale"]
            if mixup is not None:
                images, targets = mixup(images, targets)
            with autocast(cfg, device):
                loss = criterion(model(images).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if settings.clip_grad is not None:
                nn.utils.clip_grad_norm_(model.parameters(), float(settings.clip_grad))
            optimizer.step()
            loss_sum, loss_count, step = loss_sum + float(loss.detach()), loss_count + 1, step + 1
    train_seconds = time.perf_counter() - start
    accuracy = test_accuracy(model, test_data, dataset_cfg, cfg, device)
    return {
        "evaluated": what, "dataset": dataset_cfg.name, "protocol": "finetune", **accuracy,
        "train_size": len(indices),
        "epochs": int(settings.epochs), "steps": step, "batch_size": batch_size, "lr": lr,
        "num_layers": num_layers, "layer_decay": float(settings.layer_decay),
        "drop_path_rate": float(settings.drop_path_rate), "pool": settings.pool,
        "mixup": mixup is not None, "rand_augment": settings.augment.rand_augment,
        "final_train_loss": loss_sum / max(loss_count, 1) if loss_count else None,
        "train_seconds": round(train_seconds, 2), "seconds": round(time.perf_counter() - start, 2),
        "labelled": labelled,
    }


def summary(r: dict[str, Any]) -> str:
    """What was fine-tuned, on how much data, and its test accuracy."""
    lines = [
        f"fine-tuning on {r['dataset']} ({r['evaluated']}), {r['train_size']} train / {r['test_size']} test "
        f"images, {r['epochs']} epochs ({r['steps']} steps of {r['batch_size']}), lr {r['lr']:.3g}, "
        f"layer decay {r['layer_decay']:g} over {r['num_layers']} layers, drop path {r['drop_path_rate']:g}",
        f"  top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%  ({r['seconds']:.1f} s)",
    ]
    labelled = labelled_line(r.get("labelled"))
    return "\n".join(lines + ([labelled] if labelled else []))


@hydra.main(config_path=CONFIG_DIR, config_name="eval/finetune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("finetune", cfg, evaluate, summary)


if __name__ == "__main__":
    sys.exit(main())
