"""Where the Hydra configs live, and the OmegaConf resolvers they name.

One module that every entry point (pretraining, the eval CLIs, the benchmark, scripts, tests)
imports for the config path, so none imports `ssl.pretrain` just for it, and every resolver a
config uses is registered before that config is composed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def objective_names(objectives: Any) -> str:
    """`dino+mfm` for a combination, `dino` alone: the run directory's objective part."""
    return "+".join(str(name) for name in objectives) if objectives else "none"


def register_resolvers() -> None:
    """Register the resolvers conf/ uses; idempotent (runs on import)."""
    # `${ssl_objectives:${objective}}` in conf/config.yaml's hydra.run.dir.
    OmegaConf.register_new_resolver("ssl_objectives", objective_names, replace=True)


register_resolvers()
