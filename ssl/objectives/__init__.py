"""Pretraining objectives and their registry."""

from __future__ import annotations

from typing import Any

from ssl.backbones.base import Backbone
from ssl.objectives.base import Objective
from ssl.objectives.coke import CoKe
from ssl.objectives.data2vec import Data2Vec
from ssl.objectives.dino import DINO
from ssl.objectives.mae import MAE
from ssl.objectives.mfm import MFM

OBJECTIVES: dict[str, type[Objective]] = {
    "dino": DINO, "data2vec": Data2Vec, "mae": MAE, "mfm": MFM, "coke": CoKe,
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
