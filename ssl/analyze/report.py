"""An analysis written down: JSON (everything), a markdown table, and a PNG of the curves.

The plot has one row per reference encoder: label information on the left (k-NN and linear top-1,
agreement with the clean prediction, all in %; clean k-NN dashed, chance dotted), view consistency on the
right (cosines; the clean same-class and different-class cosines as dashed lines, the scale a
degradation's movement is read against). The strength training uses is marked: a line for one
value, a shaded span for a range drawn from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

LABEL_CURVES = (("knn_top1", "k-NN top-1"), ("linear_top1", "linear top-1"),
                ("knn_agreement", "k-NN agrees with clean"))
CONSISTENCY_CURVES = (("cos_clean_degraded", "cos(clean, degraded)"),
                      ("cos_two_degradations", "cos(two degradations)"))


def write_json(path: Path, results: Mapping[str, Any]) -> Path:
    path.write_text(json.dumps(results, indent=2, default=str))
    return path


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)


def markdown_table(results: Mapping[str, Any]) -> str:
    """One table per reference: a clean row, then a row per strength."""
    knob, default = results["knob"], results.get("default")
    lines = [f"# {results['objective']}: {knob} on {results['dataset']} "
             f"({results['test_size']} test images; training default: {default})", ""]
    columns = ["knn_top1", "linear_top1", "knn_agreement", "knn_mi_bits", "cos_clean_degraded",
               "cos_two_degradations", "cos_same_class_degraded", "cos_different_class_degraded"]
    for ref in results["references"]:
        clean = ref["clean"]
        shown = [c for c in columns if any(c in row for row in ref["rows"])]
        lines += [
            f"## {ref['reference']}",
            "",
            f"clean: k-NN {clean['knn_top1']:.2f}%"
            + (f", linear {clean['linear_top1']:.2f}%" if "linear_top1" in clean else "")
            + f", cos same class {clean['cos_same_class']:.3f}, different class "
              f"{clean['cos_different_class']:.3f}, chance {clean['chance_top1']:.1f}%, "
              f"label entropy {clean['label_entropy_bits']:.2f} bits",
            "",
            "| " + " | ".join([knob, *shown]) + " |",
            "|" + "---|" * (len(shown) + 1),
        ]
        for row in ref["rows"]:
            cells = [f"{row['strength']:g}", *(_cell(row.get(c)) for c in shown)]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def short_name(reference: str, width: int = 48) -> str:
    """A reference's name that fits a panel title: a long checkpoint path keeps its last parts."""
    if len(reference) <= width:
        return reference
    return "..." + reference[-(width - 3):]


def mark_default(ax: Any, default: float | Sequence[float] | None) -> None:
    if default is None:
        return
    if isinstance(default, (list, tuple)):
        ax.axvspan(float(default[0]), float(default[1]), color="0.85", zorder=0, label="training range")
    else:
        ax.axvline(float(default), color="0.4", linestyle=":", label="training default")


def plot(path: Path, results: Mapping[str, Any]) -> Path:
    """The PNG described in the module docstring."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    refs = results["references"]
    fig, axes = plt.subplots(len(refs), 2, figsize=(11, 3.4 * len(refs)), squeeze=False)
    for (left, right), ref in zip(axes, refs):
        x = [row["strength"] for row in ref["rows"]]
        for key, label in LABEL_CURVES:
            if key in ref["rows"][0]:
                left.plot(x, [row[key] for row in ref["rows"]], marker="o", label=label)
        left.axhline(ref["clean"]["knn_top1"], color="tab:blue", linestyle="--", linewidth=0.8,
                     label="k-NN top-1, clean")
        left.axhline(ref["clean"]["chance_top1"], color="k", linestyle=":", linewidth=0.8, label="chance")
        mark_default(left, results.get("default"))
        left.set_ylabel("%")
        left.set_ylim(0, 100)
        left.set_title(f"{short_name(ref['reference'])}: label information", fontsize=10)
        for key, label in CONSISTENCY_CURVES:
            right.plot(x, [row[key] for row in ref["rows"]], marker="o", label=label)
        right.axhline(ref["clean"]["cos_same_class"], color="tab:green", linestyle="--",
                      label="clean, same class")
        right.axhline(ref["clean"]["cos_different_class"], color="tab:red", linestyle="--",
                      label="clean, different class")
        mark_default(right, results.get("default"))
        right.set_ylabel("cosine")
        right.set_title(f"{short_name(ref['reference'])}: view consistency", fontsize=10)
        for ax in (left, right):
            ax.set_xlabel(results["knob"])
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle(f"{results['objective']}: {results['knob']} on {results['dataset']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_to_wandb(logger_cfg: Any, results: Mapping[str, Any], png: Path, run_dir: Path, config: dict) -> None:
    """The table (one row per reference and strength) and the plot, as one wandb run."""
    import wandb

    run = wandb.init(project=logger_cfg.get("project", "ssl"), entity=logger_cfg.get("entity"),
                     mode=logger_cfg.get("mode", "offline"), job_type="analyze-degradation",
                     dir=str(run_dir), config=config)
    columns = ["reference", "strength", *sorted({k for ref in results["references"]
                                                 for row in ref["rows"] for k in row if k != "strength"})]
    table = wandb.Table(columns=columns)
    for ref in results["references"]:
        for row in ref["rows"]:
            table.add_data(ref["reference"], row["strength"], *(row.get(c) for c in columns[2:]))
    run.log({"analysis/degradation": table, "analysis/plot": wandb.Image(str(png))})
    run.finish()
