"""Pretraining objectives and their registry.

base.py holds the Objective protocol; each method is one file (dino.py, mae.py, mfm.py, data2vec.py,
data2vec2.py, coke.py, with CoKe's clustering in coke_clustering.py; supervised.py for the labelled
images of a mixed run) whose docstring opens with a runnable example.
Settings are declared only in conf/objective/<name>.yaml; `recipe_settings` reads them outside Hydra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ssl.backbones.base import Backbone
from ssl.config import CONFIG_DIR
from ssl.objectives.base import COMPOSITE_KEYS, Objective
from ssl.objectives.coke import CoKe
from ssl.objectives.data2vec import Data2Vec
from ssl.objectives.data2vec2 import Data2Vec2
from ssl.objectives.dino import DINO
from ssl.objectives.mae import MAE
from ssl.objectives.mfm import MFM
from ssl.objectives.supervised import Supervised

OBJECTIVES: dict[str, type[Objective]] = {
    "dino": DINO, "data2vec": Data2Vec, "data2vec2": Data2Vec2, "mae": MAE, "mfm": MFM, "coke": CoKe,
    "supervised": Supervised,
}


def build_objective(name: str, cfg: Any, backbone: Backbone) -> Objective:
    """Instantiate objective `name` from its config node for `backbone`.

    Unknown names list the valid ones; an incompatible backbone fails before anything is built.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; valid: {', '.join(sorted(OBJECTIVES))}")
    cls = OBJECTIVES[name]
    cls.check_backbone(backbone)
    return cls.from_config(cfg, backbone)


def recipe_settings(name: str, **overrides: Any) -> dict[str, Any]:
    """Objective `name`'s constructor settings: conf/objective/<name>.yaml (the one place their
    defaults are written) with `overrides`, for building an objective outside Hydra (tests, notebooks).

    Nested nodes merge key by key (`teacher={"momentum": 0.99}` keeps the other teacher keys). A value
    the yaml takes from another group (`${dataset.image_size}`) must be given.
    """
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; valid: {', '.join(sorted(OBJECTIVES))}")
    recipe = OmegaConf.load(Path(CONFIG_DIR) / "objective" / f"{name}.yaml")
    settings = OmegaConf.merge(recipe, OmegaConf.create(overrides))
    values = {k: v for k, v in OmegaConf.to_container(settings).items() if k not in COMPOSITE_KEYS}
    unresolved = [k for k, v in values.items() if isinstance(v, str) and v.startswith("${")]
    if unresolved:
        raise ValueError(
            f"recipe_settings('{name}') needs {', '.join(unresolved)} (taken from another group)"
        )
    return values
