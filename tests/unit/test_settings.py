"""Each objective setting is declared once: in conf/objective/<name>.yaml.

The constructor takes every setting as a keyword-only parameter without a default, so the yaml is
the only place a default can live; these tests fail when code and config disagree.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ssl.config import CONFIG_DIR
from ssl.errors import IncompatibleConfigError
from ssl.objectives import OBJECTIVES, recipe_settings
from ssl.objectives.base import COMPOSITE_KEYS

CONF = Path(CONFIG_DIR)


def _recipe(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF / "objective" / f"{name}.yaml"))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_constructor_settings_are_the_yaml_keys(name: str) -> None:
    cls = OBJECTIVES[name]
    yaml_keys = set(_recipe(name)) - set(COMPOSITE_KEYS)
    assert set(cls.setting_names()) == yaml_keys
    assert set(COMPOSITE_KEYS) <= set(_recipe(name)), "every objective takes part in combinations"


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_no_setting_has_a_code_default(name: str) -> None:
    params = inspect.signature(OBJECTIVES[name].__init__).parameters.values()
    with_default = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is not p.empty]
    assert with_default == []


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_recipe_default_marker_is_null(name: str) -> None:
    """One marker for "the recipe decides": null, never the string auto."""
    text = (CONF / "objective" / f"{name}.yaml").read_text()
    values = [line.split("#")[0] for line in text.splitlines()]
    assert not any(v.strip().endswith(": auto") for v in values)


def _leaf_keys(node: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in node.items():
        path = f"{prefix}{key}"
        keys |= _leaf_keys(value, path + ".") if isinstance(value, dict) else {path}
    return keys


def _objective_overrides(node: dict) -> set[tuple[str, str]]:
    """(objective, dotted setting) pairs an experiment's `objective:` block sets."""
    return {
        (name, key) for name, settings in node.items() for key in _leaf_keys(settings)
    }


@pytest.mark.parametrize("path", sorted((CONF / "experiment").glob("*.yaml")), ids=lambda p: p.stem)
def test_experiment_presets_set_existing_settings(path: Path) -> None:
    preset = yaml.safe_load(path.read_text()) or {}
    for name, key in _objective_overrides(preset.get("objective", {})):
        assert name in OBJECTIVES, f"{path.name}: unknown objective {name}"
        assert key in _leaf_keys(_recipe(name)), f"{path.name}: objective.{name}.{key} is not a setting"


@pytest.mark.parametrize("path", sorted((CONF / "sweep").glob("*.yaml")), ids=lambda p: p.stem)
def test_sweeps_search_existing_settings(path: Path) -> None:
    sweep = yaml.safe_load(path.read_text())
    searched = [k for k in sweep["parameters"] if k.startswith("objective.")]
    for key in searched:
        _, name, setting = key.split(".", 2)
        assert setting in _leaf_keys(_recipe(name)), f"{path.name}: {key} is not a setting"


def test_unknown_setting_lists_the_valid_ones() -> None:
    cls = OBJECTIVES["mae"]
    cfg = {**_recipe("mae"), "mask_ratoi": 0.5}
    with pytest.raises(IncompatibleConfigError, match="mask_ratoi.*valid: .*mask_ratio"):
        cls.from_config(cfg, backbone=None)


def test_missing_setting_is_named() -> None:
    cfg = _recipe("mae")
    del cfg["norm_pix_loss"]
    with pytest.raises(IncompatibleConfigError, match="missing norm_pix_loss"):
        OBJECTIVES["mae"].from_config(cfg, backbone=None)


def test_recipe_settings_merges_nested_nodes_key_by_key() -> None:
    settings = recipe_settings("dino", teacher={"momentum": 0.5})
    assert settings["teacher"] == {**_recipe("dino")["teacher"], "momentum": 0.5}
    assert not set(COMPOSITE_KEYS) & set(settings)
