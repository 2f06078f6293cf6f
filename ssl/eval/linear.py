"""`python -m ssl.eval.linear`: linear-probe top-1 / top-5 of a checkpoint, export or baseline.

Default `probe.protocol=fast`, dinov2's protocol: features of clean (resized / centre-cropped)
train and test images are extracted once (and cached, shared with k-NN); for ViTs several
feature variants (CLS, CLS + mean-pooled patches, the CLS tokens of the last 4 blocks, ...) and
a grid of learning rates x weight decays are trained on them; the combination with the best
top-1 on a held-out 10% of the train split is retrained on all of it and scored on the test
split (ssl/eval/linear_probe.py). `probe.protocol=dino`: DINO's augmented-crop SGD protocol
(ssl/eval/augmented_linear_probe.py), which any objective's encoder can be probed with.
`labelled_fraction` / `labelled_per_class` / `labelled_file`: either protocol trains on a seeded
per-class subset of train only (ssl/eval/labelled.py); the test split stays whole.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import hydra
from omegaconf import DictConfig
from torch.utils.data import Subset

from ssl.config import CONFIG_DIR
from ssl.eval.augmented_linear_probe import dino_linear_protocol
from ssl.eval.cli import feature_stats, features_line, labelled_line, run_command
from ssl.eval.encoder import eval_device, labelled_features, labelled_splits, resolve_encoder
from ssl.eval.feature_parts import assemble, part_encoder, parts_of, primary_part, resolve_variants
from ssl.eval.labelled import labelled_train_split
from ssl.eval.linear_probe import linear_probe_variants

PROTOCOLS = ("fast", "dino")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Probe the configured encoder with the configured protocol."""
    protocol = cfg.probe.get("protocol", "fast")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown probe.protocol '{protocol}'; valid: {', '.join(PROTOCOLS)}")
    encoder_info = resolve_encoder(cfg)
    if protocol == "dino":
        return evaluate_dino_protocol(cfg, encoder_info)
    encoder = encoder_info[0]
    variants = resolve_variants(encoder, cfg.probe.get("feature_variants", "auto"))
    parts = parts_of([primary_part(encoder), *variants])
    feats = labelled_features(cfg, "a linear probe", parts=parts, encoder_info=encoder_info)
    start = time.perf_counter()
    probe = cfg.probe
    result = linear_probe_variants(
        {name: feats.variant(name) for name in variants}, feats.train_y, feats.test_y,
        lrs=[float(lr) for lr in probe.lrs],
        weight_decays=[float(wd) for wd in probe.weight_decays],
        epochs=probe.epochs,
        batch_size=probe.batch_size,
        val_fraction=probe.val_fraction,
        momentum=probe.momentum,
        retrain=probe.retrain,
        seed=cfg.seed,
    )  # fmt: skip
    return {
        "evaluated": feats.evaluated,
        "dataset": feats.dataset_cfg.name,
        "protocol": "fast",
        "feature_dim": feats.variant(result.variant)[0].shape[1],
        "epochs": probe.epochs,
        **result.to_dict(),
        **feature_stats(feats),
        "probe_seconds": round(time.perf_counter() - start, 2),
        "labelled": feats.labelled,
    }


def evaluate_dino_protocol(cfg: DictConfig, encoder_info: tuple) -> dict[str, Any]:
    encoder, dataset_cfg, what = encoder_info
    settings = cfg.probe.dino
    variant = settings.get("variant", "auto")
    if variant in (None, "auto"):
        variant = "last4" if primary_part(encoder) == "cls" else "global"
    variant = resolve_variants(encoder, [variant])[0]
    device = eval_device(cfg)
    if hasattr(encoder, "to"):
        encoder = encoder.to(device).eval()
    parts = part_encoder(encoder, parts_of([variant]))
    splits = labelled_splits(dataset_cfg, "a linear probe")
    train_data, test_data = splits["train"], splits["test"]
    num_classes = int(train_data.num_classes)  # the built dataset knows (imagefolder: its folders)
    subset, labelled = labelled_train_split(cfg, train_data)
    max_train_samples = cfg.max_train_samples
    if subset is not None:  # drawn from the max_train_samples pool already
        train_data, max_train_samples = Subset(train_data, subset.indices.tolist()), None
    start = time.perf_counter()
    result = dino_linear_protocol(
        lambda images: assemble(parts(images), variant), train_data, test_data, dataset_cfg,
        num_classes=num_classes, epochs=settings.epochs, lr=settings.lr,
        batch_size=settings.batch_size, momentum=cfg.probe.momentum, weight_decay=settings.weight_decay,
        num_workers=cfg.num_workers, device=device, seed=cfg.seed, max_train_samples=max_train_samples,
    )
    return {"evaluated": what, "dataset": dataset_cfg.name, "variant": variant, **result,
            "test_size": len(test_data), "probe_seconds": round(time.perf_counter() - start, 2),
            "labelled": labelled}


def summary(r: dict[str, Any]) -> str:
    """What was probed, on how much data, which config won, and its test accuracy."""
    labelled = labelled_line(r.get("labelled"))
    labelled = f"\n{labelled}" if labelled else ""
    if r["protocol"] == "dino":
        return (
            f"linear probe (DINO protocol: augmented crops, SGD, {r['epochs']} epochs) on {r['dataset']} "
            f"({r['evaluated']}, {r['variant']} {r['feature_dim']}-d), {r['train_size']} train / "
            f"{r['test_size']} test images\n  top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%{labelled}"
        )
    retrained = ", retrained on all of train" if r["retrained"] else ""
    variants = ", ".join(f"{name} {acc:.2f}%" for name, acc in r["variants"].items())
    return (
        f"linear probe on {r['dataset']} ({r['evaluated']}), {r['train_size']} train "
        f"({r['val_size']} held out) / {r['test_size']} test images\n"
        f"  best val top-1 per feature variant: {variants}\n"
        f"  chosen {r['variant']} ({r['feature_dim']}-d) lr={r['lr']:g} weight_decay={r['weight_decay']:g}: "
        f"val top-1 {r['val_top1']:.2f}% (best of {len(r['grid'])} configs, "
        f"{r['epochs']} epochs{retrained})\n"
        f"  top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%\n"
        f"{features_line(r)}; probe {r['probe_seconds']:.1f} s{labelled}"
    )


@hydra.main(config_path=CONFIG_DIR, config_name="eval/linear", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("linear", cfg, evaluate, summary)


if __name__ == "__main__":
    sys.exit(main())
