"""What the eval commands (`python -m ssl.eval.knn`, `ssl.eval.linear`) share around `evaluate`.

Each CLI keeps its own `evaluate` and `summary`; the way bad input ends (one message, exit
status 2), the feature-extraction numbers in the result and their summary line, and where the
result goes (ssl/eval/report.py) live here, so the commands report alike.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl.eval.encoder import LabelledFeatures
from ssl.eval.report import publish


def as_list(value: Any) -> list:
    """A config value that may be one item or a list (`k=20` or `k=[10,20]`) as a list."""
    return list(value) if OmegaConf.is_list(value) or isinstance(value, (list, tuple)) else [value]


def feature_stats(feats: LabelledFeatures) -> dict[str, Any]:
    """How the features were obtained: seconds, extraction speed, and cache hits per split."""
    return {
        "feature_seconds": round(feats.seconds, 2),
        "extraction_images_per_s": feats.images_per_s,
        "cache": feats.cached,
    }


def features_line(results: Mapping[str, Any]) -> str:
    """`features: 1.2 s, 3400 images/s extracted, cache 1/2 hit` from `feature_stats` keys."""
    speed = results["extraction_images_per_s"]
    hits = sum(v == "hit" for v in results["cache"].values())
    return (
        f"  features: {results['feature_seconds']:.1f} s"
        + (f", {speed:.0f} images/s extracted" if speed else "")
        + f", cache {hits}/{len(results['cache'])} hit"
    )


def labelled_line(record: Mapping[str, Any] | None) -> str | None:
    """`labelled subset: labelled_fraction=0.01, seed 0: 600 of 60000 train images` (None: all of train)."""
    if not record:
        return None
    how = ", ".join(f"{k}={v}" if k != "seed" else f"seed {v}" for k, v in record.items()
                    if k in ("labelled_fraction", "labelled_per_class", "labelled_file", "seed"))
    return f"  labelled subset: {how}: {record['num_labelled']} of {record['drawn_from']} train images"


def run_command(
    name: str,
    cfg: DictConfig,
    evaluate: Callable[[DictConfig], dict[str, Any]],
    summary: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """Evaluate, print the summary, publish the result (`output`, wandb); returns the results.

    Bad input (a missing checkpoint or split, an unknown setting) exits with status 2 and one
    `ssl.eval.<name>: error: ...` line instead of a traceback.
    """
    try:
        results = evaluate(cfg)
    except (FileNotFoundError, ValueError) as error:
        print(f"ssl.eval.{name}: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(summary(results))
    path = publish(cfg, results, name)
    if path is not None:
        print(f"  result: {path}")
    return results
