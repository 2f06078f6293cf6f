"""Composite objectives: several objectives on one backbone, read from the composed config.

`objective=[dino,mfm]` merges both objective files (each under `objective.<name>`); this module
turns that config into what the training module needs: each objective's loss weight
(`objective.<name>.weight`), its head parameters' optimiser settings (`lr_scale`, `weight_decay`)
and the one optimiser recipe the backbone follows. A list of objectives selects
`conf/optimizer/composite.yaml`, whose rule is: the first listed objective's recipe (or the one
named by `optimizer.from_objective`), with every key set in that file overriding the recipe.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass(frozen=True)
class HeadOptim:
    """Optimiser settings of one objective's own parameters (heads, decoders, prototypes).

    lr_scale multiplies the scheduled lr; weight_decay None follows the recipe's schedule,
    a number fixes it for the decayed parameters of this objective (biases and norms stay at 0).
    """

    lr_scale: float = 1.0
    weight_decay: float | None = None


def objective_weights(objectives: Mapping[str, Any]) -> dict[str, float]:
    """`objective.<name>.weight` of every configured objective (1.0 when absent)."""
    return {name: float(node.get("weight", 1.0)) for name, node in objectives.items()}


def head_optim_settings(objectives: Mapping[str, Any]) -> dict[str, HeadOptim]:
    """`objective.<name>.lr_scale` / `objective.<name>.weight_decay` of every objective."""
    settings = {}
    for name, node in objectives.items():
        scale = float(node.get("lr_scale", 1.0))
        if scale < 0:
            raise ValueError(f"objective.{name}.lr_scale must be >= 0, got {scale}")
        wd = node.get("weight_decay")
        settings[name] = HeadOptim(scale, None if wd is None else float(wd))
    return settings


def drop_unselected_objective_settings(cfg: DictConfig, objectives: Mapping[str, Any]) -> list[str]:
    """Remove what a preset wrote for an objective the command line did not choose; one note each.

    `experiment=quickstart` sets `objective.dino.out_dim` and so on; with `objective=mae` on the
    command line those keys still land in the config, as an `objective.dino` node holding only them.
    A node is such a leftover when it lacks settings its yaml declares (`objectives[name]
    .setting_names()`, the registry's classes) while another node is complete: an objective chosen
    with `objective=` always comes whole from its yaml. With no complete node nothing is removed,
    and building the objectives reports what is missing.
    """
    nodes = {name: set(node or {}) for name, node in cfg.objective.items() if name in objectives}
    complete = {name for name, keys in nodes.items() if set(objectives[name].setting_names()) <= keys}
    if not complete:
        return []
    notes = []
    for name in [n for n in nodes if n not in complete]:
        keys = ", ".join(sorted(nodes[name]))
        notes.append(f"objective.{name} ({keys}) ignored: {name} is not among the objectives trained "
                     f"({', '.join(complete)}); a preset sets it for its own objective")
        with open_dict(cfg.objective):
            del cfg.objective[name]
    return notes


def recipe_objective(cfg: DictConfig) -> str | None:
    """The objective whose recipe a composite optimizer node stands for, else None."""
    choice = cfg.optimizer.get("from_objective")
    if choice is None:
        return None
    names = list(cfg.objective)
    if choice == "first":
        if not names:
            raise ValueError("no objective configured: choose one with objective=<name>")
        return names[0]
    if choice not in names:
        raise ValueError(
            f"optimizer.from_objective={choice} is not one of the objectives {names}; use one of "
            f"them, 'first', or choose a recipe with optimizer=<name>."
        )
    return str(choice)


def resolve_optimizer_recipe(cfg: DictConfig, config_dir: str | Path) -> None:
    """Replace a composite optimizer node by the chosen objective's recipe plus the keys set.

    Written into the config, so the run directory and the checkpoint record the resolved recipe.
    A single objective (`optimizer: <name>` already) is left as it is.
    """
    name = recipe_objective(cfg)
    if name is None:
        return
    path = Path(config_dir) / "optimizer" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(
            f"objective '{name}' has no optimizer recipe {path}; choose one with optimizer=<name>"
        )
    recipe = OmegaConf.load(path)
    chosen = {k: v for k, v in OmegaConf.to_container(cfg.optimizer, resolve=True).items()
              if v is not None and k != "from_objective"}
    resolved = OmegaConf.merge(recipe, chosen)
    resolved.recipe_of = name  # recorded: which objective's recipe the combination trains with
    with open_dict(cfg):
        cfg.optimizer = resolved
