"""What a degradation does to a few images at each strength, drawn beside its measured curves.

The pictures come from the same `Degradation.apply` and the same seeds as the analysis's first
draw (strength_sweep.py), so the images shown are the ones the curves were measured on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ssl.analyze.degradations import Degradation
from ssl.analyze.report import mark_default


def degraded_examples(degradation: Degradation, strengths: Sequence[float], images: torch.Tensor,
                      seed: int = 0) -> torch.Tensor:
    """[1 + len(strengths), N, C, H, W] in [0, 1]: the clean uint8 `images`, then each strength.

    Seeds follow sweep_reference's first degradation of the first chunk, strength by strength.
    """
    clean = images.float().div(255.0)
    rows = [clean]
    for index, strength in enumerate(strengths):
        chunk_seed = (seed * 7919 + index * 2) * 1_000_003  # encode_degraded's seed of chunk 0
        rows.append(degradation.apply(clean.clone(), float(strength), chunk_seed).clamp(0, 1))
    return torch.stack(rows)


def examples_beside_curves(examples: torch.Tensor, results: Mapping[str, Any],
                           path: Path | None = None) -> Any:
    """A matplotlib figure: left, one row of images per strength (clean on top); right, k-NN top-1
    on the degraded images and cos(clean, degraded) per reference. Saved to `path` when given."""
    import matplotlib.pyplot as plt

    rows, count = examples.shape[:2]
    fig = plt.figure(figsize=(4 + 0.9 * count, max(4.0, 0.9 * rows)))
    grid = fig.add_gridspec(rows, count + 8, wspace=0.05, hspace=0.05)
    labels = ["clean", *(f"{s:g}" for s in results["strengths"])]
    for r in range(rows):
        for c in range(count):
            ax = fig.add_subplot(grid[r, c])
            picture = examples[r, c].permute(1, 2, 0).numpy()
            ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(labels[r], fontsize=8, rotation=0, ha="right", va="center")
    accuracy = fig.add_subplot(grid[: rows // 2 or 1, count + 2 :])
    consistency = fig.add_subplot(grid[rows // 2 or 1 :, count + 2 :])
    for ref in results["references"]:
        x = [row["strength"] for row in ref["rows"]]
        line, = accuracy.plot(x, [row["knn_top1"] for row in ref["rows"]], marker="o", label=ref["reference"])
        accuracy.axhline(ref["clean"]["knn_top1"], color=line.get_color(), linestyle="--", linewidth=0.8)
        consistency.plot(x, [row["cos_clean_degraded"] for row in ref["rows"]], marker="o",
                         color=line.get_color(), label=ref["reference"])
        consistency.axhline(ref["clean"]["cos_different_class"], color=line.get_color(), linestyle=":",
                            linewidth=0.8)
    accuracy.set_ylabel("k-NN top-1 % (dashed: clean)", fontsize=8)
    accuracy.legend(fontsize=7)
    consistency.set_ylabel("cos(clean, degraded)\n(dotted: different classes)", fontsize=8)
    consistency.set_xlabel(results["knob"])
    for ax in (accuracy, consistency):
        mark_default(ax, results.get("default"))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{results['objective']}: {results['knob']} on {results['dataset']}", fontsize=10)
    if path is not None:
        fig.savefig(path, dpi=100, bbox_inches="tight")
    return fig
