"""`python -m ssl.eval.knn`: weighted k-NN top-1 / top-5 of a checkpoint, export or baseline.

DINO's protocol: features of clean (resized / centre-cropped) train and test images,
L2-normalised, cosine similarity, the k nearest vote with weight exp(sim / T); k=20, T=0.07.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.eval.features import extract_features
from ssl.eval.knn_classifier import knn_predict_scores, topk_accuracy
from ssl.export import load_checkpoint_backbone, load_exported_backbone
from ssl.pretrain import CONFIG_DIR


def resolve_encoder(cfg: DictConfig) -> tuple[Callable[[torch.Tensor], torch.Tensor], DictConfig, str]:
    """The feature function, the dataset config, and a description of what is evaluated."""
    dataset_cfg = cfg.get("dataset")
    if cfg.pixels:
        if dataset_cfg is None:
            raise ValueError("pixels=true needs a dataset: add dataset=<name>")
        mean = torch.tensor(list(dataset_cfg.mean))[:, None, None]
        std = torch.tensor(list(dataset_cfg.std))[:, None, None]

        def raw_pixels(x: torch.Tensor) -> torch.Tensor:
            """Undo the normalisation: the baseline is the image's [0, 1] pixel values."""
            return (x * std.to(x.device) + mean.to(x.device)).flatten(1)

        return raw_pixels, dataset_cfg, "raw pixels in [0, 1]"
    if cfg.checkpoint:
        path = Path(cfg.checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if path.suffix == ".safetensors":
            if dataset_cfg is None:
                raise ValueError("exported weights carry no dataset: add dataset=<name>")
            return load_exported_backbone(path), dataset_cfg, f"exported backbone {path}"
        backbone, run_cfg = load_checkpoint_backbone(path, cfg.weights)
        if dataset_cfg is None:
            dataset_cfg = OmegaConf.create(run_cfg["dataset"])
        return backbone, dataset_cfg, f"{cfg.weights} backbone of {path}"
    if cfg.get("backbone") is not None:
        if dataset_cfg is None:
            raise ValueError("a random-init baseline needs a dataset: add dataset=<name>")
        return build_backbone(cfg.backbone), dataset_cfg, f"{cfg.backbone.name} at random init"
    raise ValueError(
        "nothing to evaluate: pass checkpoint=<.ckpt or .safetensors>, backbone=<name> "
        "(random-init baseline) or pixels=true"
    )


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    )
    encoder, dataset_cfg, what = resolve_encoder(cfg)
    splits = {split: build_dataset(dataset_cfg, split) for split in ("train", "test")}
    for split, data in splits.items():
        if not data.has_labels:
            raise ValueError(f"the {split} split of {dataset_cfg.name} has no labels: k-NN needs them")
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device).eval()
    limits = {"train": cfg.max_train_samples, "test": cfg.max_test_samples}
    loaders = [
        clean_loader(data, dataset_cfg, cfg.batch_size, cfg.num_workers, max_samples=limits[s])
        for s, data in splits.items()
    ]
    train_x, train_y = extract_features(encoder, loaders[0], device, progress=True)
    test_x, test_y = extract_features(encoder, loaders[1], device, progress=True)
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
