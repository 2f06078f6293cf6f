"""`python -m ssl.analyze.training_curve grid=<multirun dir> knob=objective.mae.mask_ratio`: what was
learned at each degradation strength, beside how much of the image that strength leaves.

A grid is a Hydra multirun of ssl.pretrain, one run per strength (e.g.
`python -m ssl.pretrain -m experiment=curve_mae_mask_ratio`, whose run directories are named by the
strength, so rerunning the multirun resumes unfinished runs and skips finished ones). For every run
that finished (result.json) evaluates k-NN (and the fast linear probe) on the full splits with
ssl.eval's own code (features cached), next to raw pixels and the same backbone untrained, and
writes curve.json, curve.md and curve.png in the grid directory. `analysis=<degradation.json>` (from
ssl.analyze.degradation on the same knob) draws the degradation's curves in a second panel.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from ssl.config import CONFIG_DIR
from ssl.eval import knn as knn_eval
from ssl.eval import linear as linear_eval
from ssl.run_dir import RESULT_FILE


def eval_settings(name: str, cfg: DictConfig, **chosen: Any) -> DictConfig:
    """conf/eval/<name>.yaml's settings (no Hydra keys) with the curve's limits and `chosen`."""
    base = OmegaConf.load(Path(CONFIG_DIR) / "eval" / f"{name}.yaml")
    for key in ("defaults", "hydra"):
        base.pop(key, None)
    base.merge_with({
        "batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "device": cfg.device,
        "cache": cfg.cache, "cache_dir": cfg.cache_dir, "seed": cfg.seed, "output": None,
        "max_train_samples": cfg.max_train_samples, "max_test_samples": cfg.max_test_samples,
    })
    if name == "knn":
        base.merge_with({"k": [cfg.k], "temperature": cfg.temperature})
    base.merge_with(chosen)
    return base


def evaluations(cfg: DictConfig, **encoder: Any) -> dict[str, float]:
    """k-NN top-1 (and linear top-1) of one encoder (checkpoint=..., pixels=true, or backbone=...)."""
    knn = knn_eval.evaluate(eval_settings("knn", cfg, **encoder))
    scores = {"knn_top1": knn["k"][cfg.k]["top1"]}
    if cfg.linear:
        scores["linear_top1"] = linear_eval.evaluate(eval_settings("linear", cfg, **encoder))["top1"]
    return scores


def grid_runs(grid: Path, knob: str) -> tuple[list[tuple[float, Path, dict]], list[str]]:
    """(strength, exported backbone, run config) of every finished run, by strength; the others.

    A run has finished once ssl.pretrain wrote its result.json (an interrupted one has not)."""
    finished, unfinished = [], []
    for config_path in sorted(grid.glob("*/config.yaml")):
        run_dir = config_path.parent
        run_cfg = OmegaConf.load(config_path)
        value = OmegaConf.select(run_cfg, knob)
        if value is None:
            raise ValueError(f"{config_path} has no setting {knob}: pass the knob the grid varies")
        result_path = run_dir / RESULT_FILE
        if not result_path.is_file():
            unfinished.append(str(run_dir))
            continue
        backbone = json.loads(result_path.read_text()).get("backbone")
        if backbone is None:
            raise ValueError(f"{run_dir} finished without exporting its backbone (export.enabled=false); "
                             "train the grid with export.enabled=true")
        # Beside result.json, wherever the grid now lies (the recorded path may be from before a move).
        finished.append((float(value), run_dir / Path(backbone).name, OmegaConf.to_container(run_cfg)))
    return sorted(finished, key=lambda item: item[0]), unfinished


def collect(cfg: DictConfig) -> dict[str, Any]:
    grid = Path(cfg.grid)
    if not grid.is_dir():
        raise FileNotFoundError(f"grid directory {grid} does not exist")
    runs, unfinished = grid_runs(grid, cfg.knob)
    if not runs:
        raise ValueError(f"{grid} holds no finished run (ssl.pretrain writes result.json when one ends)")
    first = runs[0][2]
    dataset = first["dataset"]
    rows = []
    for strength, backbone_path, _ in runs:
        scores = evaluations(cfg, checkpoint=str(backbone_path), dataset=dataset)
        rows.append({"strength": strength, "backbone": str(backbone_path), **scores})
    shape_keys = ("name", "img_size", "patch_size", "kwargs", "small_image_stem")
    backbone = {k: v for k, v in first["backbone"].items() if k in shape_keys}
    baselines = {
        "raw pixels": evaluations(cfg, pixels=True, dataset=dataset),
        f"{backbone['name']} untrained": evaluations(cfg, backbone=backbone, dataset=dataset),
    }
    analysis = json.loads(Path(cfg.analysis).read_text()) if cfg.analysis else None
    return {"knob": cfg.knob, "grid": str(grid), "dataset": dataset["name"], "rows": rows,
            "baselines": baselines, "unfinished": unfinished, "analysis": analysis}


def markdown(results: dict[str, Any]) -> str:
    columns = [c for c in ("knn_top1", "linear_top1") if c in results["rows"][0]]
    lines = [f"# Trained at each {results['knob']} ({results['dataset']}, full test split)", "",
             "| " + " | ".join([results["knob"], *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    for row in results["rows"]:
        lines.append("| " + " | ".join([f"{row['strength']:g}", *(f"{row[c]:.2f}" for c in columns)]) + " |")
    for name, scores in results["baselines"].items():
        lines.append("| " + " | ".join([name, *(f"{scores[c]:.2f}" for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


def plot(path: Path, results: dict[str, Any]) -> Path:
    """Left: what was learned at each strength (baselines dashed). Right, with `analysis`: how much
    of the image that strength leaves, for the analysis's references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analysis = results["analysis"]
    fig, axes = plt.subplots(1, 2 if analysis else 1, figsize=(11 if analysis else 6, 4), squeeze=False)
    ax = axes[0][0]
    x = [row["strength"] for row in results["rows"]]
    for key, label in (("knn_top1", "k-NN top-1"), ("linear_top1", "linear top-1")):
        if key in results["rows"][0]:
            line, = ax.plot(x, [row[key] for row in results["rows"]], marker="o", label=f"trained: {label}")
            for (name, scores), style in zip(results["baselines"].items(), ("--", ":")):
                ax.axhline(scores[key], color=line.get_color(), linestyle=style, linewidth=0.9,
                           label=f"{name}: {label}")
    ax.set_xlabel(results["knob"])
    ax.set_ylabel("% (full test split)")
    ax.set_title("learned at each strength", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if analysis:
        right = axes[0][1]
        for ref in analysis["references"]:
            xs = [row["strength"] for row in ref["rows"]]
            right.plot(xs, [row["knn_top1"] for row in ref["rows"]], marker="o",
                       label=f"{ref['reference']}: k-NN top-1 on degraded")
            right.plot(xs, [100 * row["cos_clean_degraded"] for row in ref["rows"]], marker="s",
                       linestyle="--", label=f"{ref['reference']}: 100 x cos(clean, degraded)")
        right.set_xlabel(f"{analysis['knob']} (degradation analysis)")
        right.set_title("what the degradation leaves of the image", fontsize=10)
        right.grid(alpha=0.3)
        right.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run(cfg: DictConfig) -> dict[str, Any]:
    try:
        results = collect(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"ssl.analyze.training_curve: error: {error}", file=sys.stderr)
        sys.exit(2)
    grid = Path(cfg.grid)
    (grid / "curve.json").write_text(json.dumps(results, indent=2, default=str))
    table = markdown(results)
    (grid / "curve.md").write_text(table)
    plot(grid / "curve.png", results)
    print(table)
    if results["unfinished"]:
        print(f"  not finished (rerun the multirun to resume them): {', '.join(results['unfinished'])}")
    print(f"  results: {grid}/curve.{{json,md,png}}")
    return results


@hydra.main(config_path=CONFIG_DIR, config_name="analyze/training_curve", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.exit(main())
