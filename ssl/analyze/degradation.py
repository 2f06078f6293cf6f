"""`python -m ssl.analyze.degradation objective=mae`: how strong can a degradation be before it
destroys what the image means?

For the objective's own degradation (or `analysis.knob=` another one of its recipe) and a grid of
strengths, clean labelled test images are degraded with the training code (ssl/analyze/degradations.py)
and fixed reference encoders are measured on them (ssl/analyze/strength_sweep.py): label
information that survives (k-NN / linear top-1 next to clean, agreement and mutual information with
the clean prediction) and view consistency (cosines against the same- and different-class scale).
Writes degradation.json, degradation.md and degradation.png to the run directory, and logs them to
wandb with `logger=wandb`. Examples:

    python -m ssl.analyze.degradation objective=mae analysis.max_samples=500
    python -m ssl.analyze.degradation objective=mfm analysis.knob=lowpass_radius
    python -m ssl.analyze.degradation objective=dino checkpoint=runs/.../backbone.safetensors
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from ssl.analyze.degradations import Degradation, objective_degradations
from ssl.analyze.report import log_to_wandb, markdown_table, plot, write_json
from ssl.analyze.strength_sweep import Reference, SweepSettings, normaliser, sweep_reference
from ssl.backbones.factory import build_backbone
from ssl.backbones.vit import ViTBackbone
from ssl.config import CONFIG_DIR
from ssl.data.datamodule import clean_loader
from ssl.data.datasets import build_dataset
from ssl.eval.encoder import eval_device, labelled_features, resolve_encoder
from ssl.eval.feature_parts import part_encoder, primary_part
from ssl.objectives import build_objective
from ssl.objectives.base import Objective
from ssl.redaction import redact

REFERENCES = ("pixels", "untrained", "checkpoint")


def objective_of(cfg: DictConfig, train_size: int) -> tuple[str, Objective, int | None]:
    """The one objective whose degradations are analysed, built as training builds it."""
    names = list(cfg.objective)
    if len(names) != 1:
        raise ValueError(f"analyse one objective at a time, got {names}: pass objective=<name>")
    name = names[0]
    node = cfg.objective[name]
    if "num_samples" in node and node.num_samples is None:
        node.num_samples = train_size  # CoKe's label memory: not used here, but required to build
    backbone = build_backbone(cfg.backbone)
    patch = backbone.patch_size if isinstance(backbone, ViTBackbone) else None
    return name, build_objective(name, node, backbone), patch


def chosen_degradation(cfg: DictConfig, knobs: dict[str, Degradation]) -> tuple[Degradation, list[float]]:
    """`analysis.knob` (null: the objective's own) and its strengths, or an error naming the valid ones."""
    knob = cfg.analysis.knob or next(iter(knobs))
    if knob not in knobs:
        raise ValueError(f"unknown analysis.knob={knob} for this objective; valid: {', '.join(knobs)}")
    degradation = knobs[knob]
    strengths = cfg.analysis.strengths
    if strengths is None:
        strengths = list(degradation.grid)
    elif not OmegaConf.is_list(strengths) and not isinstance(strengths, (list, tuple)):
        strengths = [strengths]
    strengths = [float(s) for s in strengths]
    degradation.check(strengths)
    return degradation, strengths


def degradation_of(cfg: DictConfig) -> tuple[str, Degradation, list[float], dict[str, Degradation]]:
    """The objective's name, the chosen knob with its strengths, and every knob of its recipe."""
    train_size = len(build_dataset(cfg.dataset, "train"))
    name, objective, patch = objective_of(cfg, train_size)
    knobs = objective_degradations(objective.batch_maskers(), objective.view_spec(), cfg.dataset, patch)
    degradation, strengths = chosen_degradation(cfg, knobs)
    return name, degradation, strengths, knobs


def composed(*overrides: str) -> DictConfig:
    """The command's config without running it (notebooks, tests): `composed("objective=mae")`."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("analyze/degradation", overrides=list(overrides))


def eval_config(cfg: DictConfig, kind: str) -> DictConfig:
    """The ssl.eval settings that resolve one reference encoder and extract its clean features."""
    return OmegaConf.create({
        "pixels": kind == "pixels",
        "checkpoint": cfg.checkpoint if kind == "checkpoint" else None,
        "weights": cfg.weights,
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True) if kind == "untrained" else None,
        "dataset": OmegaConf.to_container(cfg.dataset, resolve=True),
        "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": cfg.device,
        "cache": cfg.cache, "cache_dir": cfg.cache_dir, "seed": cfg.seed,
        "max_train_samples": cfg.analysis.max_train_samples, "max_test_samples": cfg.analysis.max_samples,
    })


def build_reference(cfg: DictConfig, kind: str) -> Reference:
    eval_cfg = eval_config(cfg, kind)
    encoder, dataset_cfg, what = resolve_encoder(eval_cfg)
    feats = labelled_features(eval_cfg, "the degradation analysis", encoder_info=(encoder, dataset_cfg, what))
    device = eval_device(eval_cfg)
    if isinstance(encoder, torch.nn.Module):
        encoder = encoder.to(device).eval()
    primary = primary_part(encoder)
    parts = part_encoder(encoder, [primary])
    return Reference(what, lambda x: parts(x)[primary], feats.train_x, feats.train_y)


def clean_test_images(cfg: DictConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The (subset of the) test split as the eval transform gives it, back in uint8 [0, 255]."""
    data = build_dataset(cfg.dataset, "test")
    if not data.has_labels:
        raise ValueError(f"the test split of {cfg.dataset.name} has no labels: the analysis needs them")
    loader = clean_loader(data, cfg.dataset, cfg.batch_size, cfg.num_workers,
                          max_samples=cfg.analysis.max_samples)
    mean = torch.tensor(list(cfg.dataset.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.dataset.std)).view(1, -1, 1, 1)
    images, labels = [], []
    for batch in loader:
        images.append((batch["image"] * std + mean).mul_(255.0).round_().clamp_(0, 255).to(torch.uint8))
        labels.append(batch["label"])
    return torch.cat(images), torch.cat(labels)


def progress_bar(description: str, total: int) -> Any:
    from tqdm import tqdm

    return lambda items: tqdm(items, desc=description, total=total, leave=False,
                              disable=not sys.stderr.isatty())


def analyse(cfg: DictConfig) -> dict[str, Any]:
    """Every reference's sweep over the chosen degradation, as one result dict."""
    kinds = list(cfg.analysis.references)
    unknown = [k for k in kinds if k not in REFERENCES]
    if unknown:
        raise ValueError(f"unknown analysis.references {unknown}; valid: {', '.join(REFERENCES)}")
    if cfg.checkpoint is None:
        kinds = [k for k in kinds if k != "checkpoint"]
    elif not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {cfg.checkpoint} does not exist")
    if not kinds:
        raise ValueError("no reference to measure: analysis.references lists none that applies")
    name, degradation, strengths, knobs = degradation_of(cfg)
    a = cfg.analysis
    settings = SweepSettings(k=a.k, temperature=a.temperature, linear=a.linear,
                             linear_epochs=a.linear_epochs, pairs=a.pairs, chunk_size=a.chunk_size,
                             seed=a.seed)
    images, labels = clean_test_images(cfg)
    normalise = normaliser(cfg.dataset.mean, cfg.dataset.std)
    device = eval_device(cfg)
    sweeps = []
    for kind in kinds:
        reference = build_reference(cfg, kind)
        bar = progress_bar(f"{kind}: {degradation.knob}", len(strengths))
        sweeps.append(sweep_reference(reference, images, labels, normalise, degradation, strengths,
                                      settings, device, bar))
    default = degradation.default
    return {
        "objective": name, "knob": degradation.knob, "description": degradation.description,
        "default": list(default) if isinstance(default, tuple) else default,
        "strengths": strengths, "dataset": cfg.dataset.name, "test_size": len(labels),
        "knobs": list(knobs), "settings": settings.__dict__, "references": sweeps,
    }


def summary(results: dict[str, Any]) -> str:
    lines = [f"{results['objective']}: {results['knob']} on {results['dataset']} "
             f"({results['test_size']} test images), training default {results['default']}"]
    for ref in results["references"]:
        clean = ref["clean"]
        lines.append(f"  {ref['reference']}: clean k-NN {clean['knn_top1']:.2f}%, cos same / different "
                     f"class {clean['cos_same_class']:.3f} / {clean['cos_different_class']:.3f}")
        for row in ref["rows"]:
            lines.append(f"    {row['strength']:<8g} k-NN {row['knn_top1']:6.2f}%  agree "
                         f"{row['knn_agreement']:6.2f}%  cos(clean, degraded) {row['cos_clean_degraded']:.3f}"
                         f"  cos(two) {row['cos_two_degradations']:.3f}")
    return "\n".join(lines)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Analyse, print, write JSON / markdown / PNG to the run directory; bad input exits 2."""
    try:
        results = analyse(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"ssl.analyze.degradation: error: {error}", file=sys.stderr)
        sys.exit(2)
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config = redact(OmegaConf.to_container(cfg, resolve=True))
    results["config"] = config
    write_json(run_dir / "degradation.json", results)
    (run_dir / "degradation.md").write_text(markdown_table(results))
    png = plot(run_dir / "degradation.png", results)
    if cfg.logger is not None and cfg.logger.get("name") == "wandb":
        log_to_wandb(cfg.logger, results, png, run_dir, config)
    print(summary(results))
    print(f"  results: {run_dir}/degradation.{{json,md,png}}")
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="analyze/degradation", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
