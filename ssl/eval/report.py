"""Where evaluation results go: stdout (the CLIs print), a JSON file, and wandb when asked."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl.redaction import redact, redact_overrides


def output_path(cfg: DictConfig, name: str) -> Path | None:
    """`output=<path>`; `output=auto` (default): `<checkpoint stem>.<name>.json` beside a checkpoint.

    Baselines (random init, pixels) have no checkpoint to sit beside: only an explicit path writes.
    """
    output = cfg.get("output")
    if output and output != "auto":
        return Path(output)
    if output == "auto" and cfg.get("checkpoint"):
        checkpoint = Path(cfg.checkpoint)
        return checkpoint.with_name(f"{checkpoint.stem}.{name}.json")
    return None


def flat_metrics(results: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers of a nested result dict as 'a/b/c' keys (lists are skipped), for wandb."""
    flat: dict[str, float] = {}
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flat_metrics(value, f"{name}/"))
        elif isinstance(value, bool):
            continue
        elif isinstance(value, (int, float)):
            flat[name] = float(value)
    return flat


def publish(cfg: DictConfig, results: Mapping[str, Any], name: str) -> Path | None:
    """Write the JSON (returns its path) and log to wandb when `wandb.enabled=true`."""
    path = output_path(cfg, name)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str))
    settings = cfg.get("wandb") or {}
    if settings.get("enabled", False):
        import wandb

        sys.argv[:] = redact_overrides(sys.argv)  # wandb records the command line
        run = wandb.init(
            project=settings.get("project", "ssl"), entity=settings.get("entity"),
            mode=settings.get("mode", "offline"), job_type=f"eval-{name}",
            dir=str(path.parent) if path is not None else None,
            config=redact(OmegaConf.to_container(cfg, resolve=True)),
        )
        metrics = flat_metrics(results, f"eval/{name}/")
        run.log(metrics)
        run.summary.update(metrics)
        run.finish()
    return path
