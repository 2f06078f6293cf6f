"""Pretraining objectives and their registry."""

from __future__ import annotations

from typing import Any

from ssl.objectives.base import Objective
from ssl.objectives.dino import DINO

OBJECTIVES: dict[str, type[Objective]] = {"dino": DINO}


def build_objective(name: str, cfg: Any, embed_dim: int) -> Objective:
    """Instantiate objective `name` from its config node; unknown names list the valid ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective '{name}'; valid: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name].from_config(cfg, embed_dim)
