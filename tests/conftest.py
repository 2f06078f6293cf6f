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


def pretrain_in_process(overrides: list[str], run_dir: Path) -> tuple[int, str]:
    """Run `ssl.pretrain` in this process on the config its command line would compose: returns
    (exit status, stderr). A subprocess would spend ~12 s importing torch and Lightning per run;
    the command-line path itself is tested by the subprocess tests (tests/e2e/, the one CLI case of
    tests/unit/test_bad_configs.py)."""
    import contextlib
    import io

    from hydra import compose, initialize_config_dir

    from ssl.config import CONFIG_DIR
    from ssl.pretrain import run

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, f"run_dir={run_dir}"])
    stderr = io.StringIO()
    argv = sys.argv[:]
    try:
        with contextlib.redirect_stderr(stderr):
            run(cfg)
    except SystemExit as stop:
        return int(stop.code or 0), stderr.getvalue()
    finally:
        sys.argv[:] = argv  # run() rewrites sys.argv (secrets redacted) for wandb
    return 0, stderr.getvalue()


def pretrain_refusal(overrides: list[str], run_dir: Path) -> tuple[int, str]:
    """`pretrain_in_process` for a config it should refuse. max_steps=1: a refusal that regressed
    fails on its status after one step, not hours later."""
    return pretrain_in_process([*overrides, "trainer.max_steps=1"], run_dir)
