"""Shared test helpers. Tests never touch the network: wandb runs offline."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Evaluation feature caches go to a throw-away directory, never to ~/.cache.
os.environ.setdefault("SSL_CACHE_DIR", tempfile.mkdtemp(prefix="ssl-test-features-"))


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT
