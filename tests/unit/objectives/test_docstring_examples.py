"""Each objective's module docstring holds a runnable example; it must keep running."""

from __future__ import annotations

import doctest
import importlib

import pytest

OBJECTIVE_MODULES = ["dino", "mae", "mfm", "data2vec", "data2vec2", "coke", "supervised"]


@pytest.mark.parametrize("name", OBJECTIVE_MODULES)
def test_docstring_example_runs(name: str) -> None:
    module = importlib.import_module(f"ssl.objectives.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"ssl/objectives/{name}.py has no docstring example"
    assert result.failed == 0, f"the example in ssl/objectives/{name}.py failed (see output above)"
