"""The command an interrupted run prints to continue: its overrides, its directory, no secrets."""

from __future__ import annotations

import shlex
from pathlib import Path

from ssl.run_dir import resume_command


def test_overrides_are_kept_and_the_run_directory_pinned(tmp_path: Path) -> None:
    overrides = ["experiment=quickstart", "hydra.run.dir=old/place", 'checkpoint="runs/a=1/b.safetensors"',
                 "+logger.api_key=abc123", "data.batch_size=64"]
    command = resume_command(overrides, tmp_path / "run")
    args = shlex.split(command)
    assert args[:3] == ["python", "-m", "ssl.pretrain"]
    assert args[3:] == ["experiment=quickstart", 'checkpoint="runs/a=1/b.safetensors"', "data.batch_size=64",
                        f"hydra.run.dir={tmp_path / 'run'}"]
    assert "abc123" not in command


def test_a_directory_under_the_working_directory_is_shown_relative(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resume_command([], tmp_path / "runs" / "x").endswith("hydra.run.dir=runs/x")
