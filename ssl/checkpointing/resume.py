"""Auto-resume: the same command in the same run directory continues that run.

A run directory holds `config.yaml` (the resolved config) and `checkpoints/`. Restarting the
command that created it (after a crash, a SIGKILL, a pre-empted job) resumes from its newest
checkpoint; a different config there is refused with the keys that differ, so one directory
never mixes two runs.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

IGNORED_KEYS = ("resume",)  # how a run was started, not what it trains
STEP_IN_NAME = re.compile(r"step(\d+)")


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint was written at (from its name, else from the file)."""
    match = STEP_IN_NAME.search(path.stem)
    if match and path.name != "last.ckpt":
        return int(match.group(1))
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt.get("global_step", -1))


def readable_step(path: Path) -> int | None:
    """`checkpoint_step`, or None for a file that does not load (cut short by a non-atomic writer)."""
    try:
        return checkpoint_step(path)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError):
        return None


def latest_checkpoint(directory: Path) -> Path | None:
    """The checkpoint with the most steps in `directory`; last.ckpt wins ties (it is saved last)."""
    steps = {p: readable_step(p) for p in Path(directory).glob("*.ckpt") if p.is_file()}
    candidates = [p for p, step in steps.items() if step is not None]
    if not candidates:
        return None
    return max(candidates, key=lambda p: (steps[p], p.name == "last.ckpt"))


def config_differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for every leaf that differs between two plain (resolved) configs.

    A key absent on one side and null on the other is no difference: a setting added to the
    config after a run started, at its off value, must not stop that run from resuming.
    """
    if isinstance(old, dict) and isinstance(new, dict):
        lines: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            if not prefix and key in IGNORED_KEYS:
                continue
            name = f"{prefix}{key}"
            if (key not in old and new[key] is None) or (key not in new and old[key] is None):
                continue
            if key not in old:
                lines.append(f"{name}: (absent) -> {new[key]!r}")
            elif key not in new:
                lines.append(f"{name}: {old[key]!r} -> (absent)")
            else:
                lines += config_differences(old[key], new[key], f"{name}.")
        return lines
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]
