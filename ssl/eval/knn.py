"""`python -m ssl.eval.knn`: weighted k-NN top-1 / top-5 of a checkpoint, export or baseline.

DINO's protocol: features of clean (resized / centre-cropped) train and test images,
L2-normalised, cosine similarity, the k nearest vote with weight exp(sim / T). A grid of k
(10, 20, 100, 200 by default) and T is scored from one similarity pass; features are cached on
disk and shared with the linear probe. `labelled_fraction` / `labelled_per_class` /
`labelled_file`: the bank is a seeded per-class subset of train (ssl/eval/labelled.py).
"""

from __future__ import annotations

import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from ssl.config import CONFIG_DIR
from ssl.eval.cli import as_list, feature_stats, features_line, labelled_line, run_command
from ssl.eval.encoder import labelled_features
from ssl.eval.knn_classifier import knn_grid_scores
from ssl.eval.metrics import topk_accuracy


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    feats = labelled_features(cfg, "k-NN")
    train_x, train_y, test_x, test_y = feats.train_x, feats.train_y, feats.test_x, feats.test_y
    # A k beyond the bank (a small labelled subset) is the whole bank: scored, and reported, once.
    ks = list(dict.fromkeys(min(int(k), len(train_y)) for k in as_list(cfg.k)))
    temperatures = [float(t) for t in as_list(cfg.temperature)]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    grid = knn_grid_scores(train_x, train_y, test_x, num_classes, ks, temperatures)
    results: dict[str, Any] = {
        "evaluated": feats.evaluated, "dataset": feats.dataset_cfg.name, "feature": feats.primary,
        "feature_dim": train_x.shape[1], "train_size": len(train_y), "test_size": len(test_y),
        "temperature": temperatures[0] if len(temperatures) == 1 else temperatures,
        "k": {}, "grid": [], **feature_stats(feats), "labelled": feats.labelled,
    }
    for (k, t), scores in grid.items():
        accuracy = topk_accuracy(scores, test_y)
        results["grid"].append({"k": k, "temperature": t, **accuracy})
        if t == temperatures[0]:
            results["k"][k] = accuracy
    best = max(results["grid"], key=lambda r: r["top1"])
    results["best"] = best
    return results


def summary(results: dict[str, Any]) -> str:
    lines = [
        f"k-NN on {results['dataset']} ({results['evaluated']}, {results['feature']} "
        f"{results['feature_dim']}-d), cosine, {results['train_size']} train / "
        f"{results['test_size']} test images"
    ]
    for r in results["grid"]:
        lines.append(
            f"  k={r['k']:<4d} T={r['temperature']:<5g} top-1 {r['top1']:.2f}%  top-5 {r['top5']:.2f}%"
        )
    lines.append(features_line(results))
    labelled = labelled_line(results.get("labelled"))
    return "\n".join(lines + ([labelled] if labelled else []))


@hydra.main(config_path=CONFIG_DIR, config_name="eval/knn", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run_command("knn", cfg, evaluate, summary)


if __name__ == "__main__":
    sys.exit(main())
