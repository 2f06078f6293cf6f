"""Shared test helpers. Tests never touch the network: wandb runs offline."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Tests are laid out like the package (unit/<subpackage>/, distributed/, e2e/); test files share
# helpers by module name (`from test_module import tiny_module`), so every test folder is importable.
for _folder in sorted({path.parent for path in Path(__file__).parent.rglob("test_*.py")}):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Evaluation feature caches go to a throw-away directory, never to ~/.cache.
os.environ.setdefault("SSL_CACHE_DIR", tempfile.mkdtemp(prefix="ssl-test-features-"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
