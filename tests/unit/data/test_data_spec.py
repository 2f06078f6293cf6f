"""The data contract: the data layer knows no method, and maskers say which keys they write."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from ssl.data.datamodule import MaskingCollate, merge_view_specs
from ssl.data.frequency import FrequencyMasker
from ssl.data.masking import BlockMasker, BlockMaskGenerator, RandomTokenMasker
from ssl.data.spec import CropRecipe, ViewSpec
from ssl.errors import IncompatibleConfigError
from ssl.objectives import OBJECTIVES

DATA = Path(__file__).resolve().parents[3] / "ssl" / "data"


def test_the_data_layer_imports_no_objective_and_names_none_in_code() -> None:
    """A new objective must not need a file under ssl/data: no imports of the method layer, and no
    objective name in the code (docstrings and comments may cite where a recipe comes from)."""
    names = re.compile(r"\b(" + "|".join(OBJECTIVES) + r")\b", re.IGNORECASE)
    for path in sorted(DATA.glob("*.py")):
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith(("ssl.objectives", "ssl.module", "ssl.teacher")), path
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
                assert not names.search(node.value), f"{path.name}: string {node.value!r} names a method"

def test_maskers_expose_the_keys_they_write() -> None:
    token = RandomTokenMasker(16, 0.75, prefix="a")
    block = BlockMasker(BlockMaskGenerator.scaled((4, 4)), prefix="b", copies=2)
    freq = FrequencyMasker(8, 2.0, 0.5, key="c_keep")
    for masker in (token, block, freq):
        assert set(masker(3)) == set(masker.keys)
    assert token.keys == ("a_ids_shuffle", "a_ids_restore", "a_mask") and block.keys == ("b_mask",)


def test_two_maskers_writing_one_key_are_refused() -> None:
    with pytest.raises(IncompatibleConfigError, match="batch key 'x_mask'"):
        MaskingCollate([
            RandomTokenMasker(16, 0.5, prefix="x"),
            BlockMasker(BlockMaskGenerator.scaled((4, 4)), "x"),
        ])


def test_an_objective_owned_recipe_merges_by_value() -> None:
    mine = CropRecipe(local_blur=0.3, name="mine")
    a = ViewSpec(2, 4, crop_recipe=mine, global_crop_scale=[0.2, 1])
    b = ViewSpec(2, 2, crop_recipe=CropRecipe(local_blur=0.3, name="mine"), global_crop_scale=(0.2, 1.0))
    merged = merge_view_specs([a, b])
    assert merged.crop_recipe == mine and merged.local_crops == 4 and merged.global_crop_scale == (0.2, 1.0)
    with pytest.raises(IncompatibleConfigError, match="same crop recipe"):
        merge_view_specs([a, ViewSpec(2, 4, global_crop_scale=(0.2, 1.0))])
