"""`python -m ssl.eval.knn`: weighted k-NN top-1 / top-5 of a checkpoint, export or baseline.

DINO's protocol: features of clean (resized / centre-cropped) train and test images,
L2-normalised, cosine similarity, the k nearest vote with weight exp(sim / T); k=20, T=0.07.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl.eval.encoder import labelled_features
from ssl.eval.knn_classifier import knn_predict_scores, topk_accuracy
from ssl.pretrain import CONFIG_DIR


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    feats = labelled_features(cfg, "k-NN")
    train_x, train_y, test_x, test_y = feats.train_x, feats.train_y, feats.test_x, feats.test_y
    what, dataset_cfg = feats.evaluated, feats.dataset_cfg
    ks = list(cfg.k) if OmegaConf.is_list(cfg.k) else [int(cfg.k)]
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    results = {"evaluated": what, "dataset": dataset_cfg.name, "temperature": cfg.temperature,
               "train_size": len(train_y), "test_size": len(test_y), "k": {}}
    for k in ks:
        scores = knn_predict_scores(train_x, train_y, test_x, num_classes, k, cfg.temperature)
        results["k"][k] = topk_accuracy(scores, test_y)
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="eval/knn", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        results = evaluate(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"ssl.eval.knn: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"k-NN on {results['dataset']} ({results['evaluated']}), cosine, T={results['temperature']}, "
          f"{results['train_size']} train / {results['test_size']} test images")
    for k, acc in results["k"].items():
        print(f"  k={k:<4d} top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%")
    if cfg.output:
        Path(cfg.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.exit(main())
