"""A wandb API key (or any secret-named setting) never lands in a config dump, a log or a checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from omegaconf import OmegaConf

from ssl.redaction import REDACTED, is_secret_name, redact, redact_overrides

SECRET, TOKEN = "SECRET123abc", "TOKEN456def"


@pytest.mark.parametrize("name", [
    "api_key", "wandb_api_key", "apikey", "API_KEY", "token", "auth_token", "hf_token", "password",
    "passwd", "client_secret", "secret", "aws_secret_access_key", "private_key", "credentials",
])
def test_secret_names(name: str) -> None:
    assert is_secret_name(name)


@pytest.mark.parametrize("name", [
    "class_token", "mask_token", "reg_tokens", "num_tokens", "cls_token", "keep", "k", "key_dim",
    "entity", "project", "mode", "lr", "batch_size",
])
def test_settings_that_are_not_secrets(name: str) -> None:
    assert not is_secret_name(name)


def test_redact_hides_nested_values_and_keeps_everything_else() -> None:
    cfg = {"logger": {"name": "wandb", "api_key": SECRET, "tags": ["a"], "token": None},
           "backbone": {"kwargs": {"class_token": True}}, "extra": [{"password": "p"}]}
    out = redact(cfg)
    assert out == {"logger": {"name": "wandb", "api_key": REDACTED, "tags": ["a"], "token": None},
                   "backbone": {"kwargs": {"class_token": True}}, "extra": [{"password": REDACTED}]}
    assert cfg["logger"]["api_key"] == SECRET  # the live config still holds the key


def test_redact_overrides() -> None:
    argv = ["-m", "ssl.pretrain", f"+logger.api_key={SECRET}", f"++logger.token={TOKEN}",
            "backbone=vit_t", "hydra.run.dir=/tmp/x", "--cfg", "+backbone.kwargs.class_token=false"]
    assert redact_overrides(argv) == [
        "-m", "ssl.pretrain", "+logger.api_key=***", "++logger.token=***", "backbone=vit_t",
        "hydra.run.dir=/tmp/x", "--cfg", "+backbone.kwargs.class_token=false",
    ]


def test_wandb_logger_gets_the_key_from_the_environment(tmp_path: Path, monkeypatch) -> None:
    from ssl.pretrain import build_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    cfg = OmegaConf.create({"logger": {"name": "wandb", "project": "ssl", "entity": None, "tags": [],
                                       "group": None, "mode": "disabled", "log_model": False,
                                       "api_key": SECRET}})
    logger = build_logger(cfg, tmp_path)
    assert os.environ["WANDB_API_KEY"] == SECRET
    logger.experiment.finish()


def run_files(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.is_file()]


TINY = [
    "backbone=vit_t", "+backbone.kwargs.depth=1", "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=32", "objective.dino.local_crops=1", "data.batch_size=8",
    "data.num_workers=0", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
    "knn.max_train_samples=100", "knn.max_test_samples=50", "trainer.log_every_n_steps=1",
    f"+logger.api_key={SECRET}", f"+logger.token={TOKEN}",
]


def pretrain(args: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", WANDB_SILENT="true")
    out = subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def assert_no_secret(root: Path, out: subprocess.CompletedProcess) -> list[Path]:
    files = [p for p in root.rglob("*") if p.is_file()]
    leaks = [str(p) for p in files for s in (SECRET, TOKEN) if s.encode() in p.read_bytes()]
    assert leaks == []
    assert SECRET not in out.stdout + out.stderr and TOKEN not in out.stdout + out.stderr
    return files


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("logger", ["csv", "wandb"])
def test_no_file_of_a_run_holds_the_secret(logger: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = pretrain([*TINY, f"logger={logger}", f"hydra.run.dir={run_dir}"])
    names = {p.name for p in assert_no_secret(run_dir, out)}
    assert {"config.yaml", "last.ckpt", "backbone.safetensors"} <= names
    assert "hparams.yaml" in names if logger == "csv" else any(n.endswith(".wandb") for n in names)
    # The keys were there, written as *** (config.yaml and the checkpoint's hyperparameters).
    assert "api_key: '***'" in (run_dir / "config.yaml").read_text()
    ckpt = (run_dir / "checkpoints" / "last.ckpt").read_bytes()
    assert b"api_key" in ckpt and REDACTED.encode() in ckpt


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_a_multirun_sweep_holds_no_secret_either(tmp_path: Path) -> None:
    """Hydra's launcher prints each job's overrides and its sweeper writes multirun.yaml."""
    sweep = tmp_path / "sweep"
    out = pretrain(["-m", *TINY, "knn.enabled=false", "export.enabled=false", f"hydra.sweep.dir={sweep}"])
    assert "+logger.api_key=***" in out.stdout  # the launcher's job list
    files = assert_no_secret(sweep, out)
    assert sweep / "multirun.yaml" in files and sweep / "0" / "config.yaml" in files


def test_redact_text_and_the_logging_filter(caplog) -> None:
    import logging

    from ssl.redaction import RedactingFilter, redact_text

    line = f"#0 : backbone=vit_t +logger.api_key={SECRET} +backbone.kwargs.class_token=false"
    assert redact_text(line) == "#0 : backbone=vit_t +logger.api_key=*** +backbone.kwargs.class_token=false"
    joined = f"+a.depth=1,+logger.token={TOKEN},backbone=vit_t"  # Hydra's override_dirname
    assert redact_text(joined) == "+a.depth=1,+logger.token=***,backbone=vit_t"
    logger = logging.getLogger("test_secrets")
    logger.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="test_secrets"):
        logger.info("\t#%d : %s", 0, line)
    assert SECRET not in caplog.text and "api_key=***" in caplog.text


def test_redact_yaml_file(tmp_path: Path) -> None:
    from ssl.redaction import redact_yaml_file

    path = tmp_path / "multirun.yaml"
    path.write_text(f"hydra:\n  overrides:\n    task: ['+logger.api_key={SECRET}', 'seed=1']\n"
                    f"logger:\n  api_key: {SECRET}\nrun_dir: ${{hydra:runtime.output_dir}}\n")
    redact_yaml_file(path)
    cfg = OmegaConf.load(path)
    assert SECRET not in path.read_text()
    assert list(cfg.hydra.overrides.task) == ["+logger.api_key=***", "seed=1"]
    assert cfg.logger.api_key == REDACTED
    assert "${hydra:runtime.output_dir}" in path.read_text()  # interpolations kept as written
