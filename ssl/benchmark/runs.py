"""Several benchmark runs: the plan (objectives x backbones), one run here or in a fresh process."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import tempfile
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf

from ssl.benchmark.measure import benchmark
from ssl.benchmark.step import default_device, resolve_precision
from ssl.config import CONFIG_DIR
from ssl.errors import IncompatibleConfigError

PACKAGE_ROOT = Path(__file__).resolve().parents[2]


# The settings an isolated run's process needs; the others belong to the calling process.
CHILD_SETTINGS = ("steps", "warmup", "data_pipeline", "num_samples", "precision", "real_data")


@dataclass
class Run:
    """One benchmark: its pretraining overrides and the names a failed run is reported under."""

    objective: str
    backbone: str
    overrides: list[str]


def override_value(overrides: list[str], key: str) -> str | None:
    """The last `key=<value>` among Hydra overrides (`+key=`, `++key=` too), else None."""
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == key and "=" in o]
    return values[-1] if values else None


def objective_names(spec: Any) -> list[str]:
    """`dino`, `dino+mfm` or a list `[dino, mfm]` as objective names."""
    parts = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else str(spec).split("+")
    return [str(s).strip() for s in parts if str(s).strip()]


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


OBJECTIVE_KEY = re.compile(r"^[+~]*objective\.([^.=]+)")


def applies_to(override: str, objectives: list[str]) -> bool:
    """False for another objective's `objective.<name>.*` setting (a run of `objectives` would
    fail on it), True for everything else."""
    match = OBJECTIVE_KEY.match(override)
    return match is None or match.group(1) in objectives


def planned_runs(overrides: list[str], bench: DictConfig) -> list[Run]:
    """The cross product of `bench.objectives` x `bench.backbones`, or one run of `overrides`."""
    objectives, backbones = bench.get("objectives"), bench.get("backbones")
    runs = []
    for names in [None] if objectives is None else [objective_names(o) for o in as_list(objectives)]:
        base = list(overrides)
        named = override_value(overrides, "objective")
        objective = ",".join(objective_names(named.strip("[]").split(","))) if named else "default"
        if names is not None:  # this run's objectives replace any `objective=`
            objective = ",".join(names)
            base = [o for o in base if override_value([o], "objective") is None]
            base.append(f"objective={names[0]}" if len(names) == 1 else f"objective=[{objective}]")
        if names is not None or named is not None:  # other objectives' settings do not apply
            base = [o for o in base if applies_to(o, objective.split(","))]
        for backbone in [None] if backbones is None else as_list(backbones):
            if backbone is None:
                runs.append(Run(objective, override_value(overrides, "backbone") or "default", base))
            else:
                kept = [o for o in base if override_value([o], "backbone") is None]
                runs.append(Run(objective, str(backbone), [*kept, f"backbone={backbone}"]))
    return runs


def compose_config(overrides: list[str], bench: DictConfig) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = None
    cfg.bench = bench
    return cfg


def failed_row(
    run: Run, status: str, reason: str, cfg: DictConfig | None = None, **extra: Any
) -> dict[str, Any]:
    """The row of a run that did not finish: why, and what it would have measured."""
    row = {"status": status, "objective": run.objective, "backbone": run.backbone, "reason": reason}
    if cfg is not None:
        row.update(objective=",".join(cfg.objective.keys()), backbone=cfg.backbone.name,
                   batch_size=cfg.data.batch_size)
    return {**row, **extra}


def run_in_process(run: Run, bench: DictConfig) -> dict[str, Any]:
    """One run here; a failure (an incompatible pair, a bad override) becomes its row."""
    cfg = None
    precision = resolve_precision(bench.precision, default_device())
    try:
        cfg = compose_config(run.overrides, bench)
        torch.manual_seed(0)
        row = benchmark(cfg, int(bench.steps), int(bench.warmup))
    except IncompatibleConfigError as error:
        return failed_row(run, "incompatible", str(error), cfg, precision=precision, isolated=False)
    except Exception as error:  # noqa: BLE001 - reported in the row; the other runs go on
        traceback.print_exc()
        reason = f"{type(error).__name__}: {error}"
        return failed_row(run, "error", reason, cfg, precision=precision, isolated=False)
    return {**row, "isolated": False}


def run_isolated(run: Run, bench: DictConfig) -> dict[str, Any]:
    """One run in a fresh Python process (honest peak RSS); it writes its row to a temp file."""
    with tempfile.TemporaryDirectory(prefix="ssl-bench-") as tmp:
        result = Path(tmp) / "row.json"
        settings = [f"bench.{k}={'null' if bench[k] is None else bench[k]}" for k in CHILD_SETTINGS]
        code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from ssl.benchmark import main; main()"
        command = [sys.executable, "-c", code, str(PACKAGE_ROOT), *run.overrides, *settings,
                   "bench.isolate=false", f"bench.result_file={result}"]
        returncode = subprocess.run(command, stdout=subprocess.DEVNULL, check=False).returncode
        if result.is_file():
            return {**json.loads(result.read_text())[0], "isolated": True}
    cause = f"exit code {returncode}"
    if returncode < 0:
        cause = f"killed by {signal.Signals(-returncode).name}"
        cause += " (out of memory?)" if returncode == -signal.SIGKILL else ""
    return failed_row(run, "error", f"the benchmark process ended without a result ({cause}; "
                      "its stderr is above)", isolated=True)
