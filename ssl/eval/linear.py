"""`python -m ssl.eval.linear`: linear-probe top-1 / top-5 of a checkpoint, export or baseline.

dinov2's fast protocol: features of clean (resized / centre-cropped) train and test images are
extracted once, then a grid of learning rates x weight decays is trained at once on them; the
config with the best top-1 on a held-out 10% of the train split is retrained on all of it and
scored on the test split (ssl/eval/linear_probe.py).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from ssl.eval.encoder import labelled_features
from ssl.eval.linear_probe import linear_probe
from ssl.pretrain import CONFIG_DIR


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Extract train / test features of the configured encoder and probe them."""
    feats = labelled_features(cfg, "a linear probe")
    train_x, train_y, test_x, test_y = feats.train_x, feats.train_y, feats.test_x, feats.test_y
    start = time.perf_counter()
    probe = cfg.probe
    result = linear_probe(
        train_x, train_y, test_x, test_y,
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
        "feature_dim": train_x.shape[1],
        "epochs": probe.epochs,
        **result.to_dict(),
        "feature_seconds": round(feats.seconds, 2),
        "probe_seconds": round(time.perf_counter() - start, 2),
    }


def summary(r: dict[str, Any]) -> str:
    """What was probed, on how much data, which config won, and its test accuracy."""
    retrained = ", retrained on all of train" if r["retrained"] else ""
    return (
        f"linear probe on {r['dataset']} ({r['evaluated']}), {r['feature_dim']}-d features, "
        f"{r['train_size']} train ({r['val_size']} held out) / {r['test_size']} test images\n"
        f"  chosen lr={r['lr']:g} weight_decay={r['weight_decay']:g}: val top-1 {r['val_top1']:.2f}% "
        f"(best of {len(r['grid'])} configs, {r['epochs']} epochs{retrained})\n"
        f"  top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%"
    )


@hydra.main(config_path=CONFIG_DIR, config_name="eval/linear", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        results = evaluate(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"ssl.eval.linear: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary(results))
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
