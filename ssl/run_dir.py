"""The run directory: what a pretraining run writes there first, and when it may reuse one.

A run directory holds one run. `prepare_run_dir` checks it before the first batch (same config:
resume; other config: refuse) and records the resolved config; the wandb run id and the sweep's
multirun.yaml are kept here too, secrets redacted. Rank > 0 processes follow rank 0's choices.
"""

from __future__ import annotations

import json
import os
import secrets
import shlex
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ssl.checkpointing.atomic_io import remove_partial_saves
from ssl.checkpointing.resume import checkpoint_step, config_differences, latest_checkpoint
from ssl.redaction import is_secret_name, redact, redact_yaml_file

WANDB_ID_FILE = "wandb_run_id"
RESULT_FILE = "result.json"  # written when a run has finished: its presence means "do not train again"


class RunDirectoryInUseError(FileExistsError):
    """The run directory already holds a run; a new run never overwrites it."""


def launched_as_worker_rank() -> bool:
    """True in the processes Lightning's DDP launcher (or torchrun / SLURM) starts for ranks > 0.

    They rerun `ssl.pretrain` with the same run directory, which rank 0 has already prepared.
    """
    for var in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        if int(os.environ.get(var, "0") or 0) > 0:
            return True
    return False


def resolved_config(cfg: DictConfig) -> dict:
    """The config as config.yaml records it (resolved, secrets redacted, through YAML, so both
    sides compare alike)."""
    return OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(recorded_config(cfg))))


def prepare_run_dir(run_dir: Path, cfg: DictConfig) -> Path | None:
    """Create the run directory and write the resolved config; returns the checkpoint to resume.

    A directory that already holds a run is reused only by the same config (`resume` aside): the
    same command restarted after a crash continues from the newest checkpoint there. Any other
    config is refused with the keys that differ; a new run never overwrites an old one.
    """
    checkpoints = run_dir / "checkpoints"
    if launched_as_worker_rank():  # rank 0 has checked the directory; follow its choice
        latest = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        return latest or (Path(cfg.resume) if cfg.get("resume") else None)
    if (run_dir / "config.yaml").exists() or checkpoints.exists():
        if not (run_dir / "config.yaml").exists():
            raise RunDirectoryInUseError(
                f"{run_dir} already holds a run (checkpoints without a config.yaml). Choose a new "
                "directory with hydra.run.dir=<path>, or remove the old one yourself."
            )
        old = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
        differences = config_differences(old, resolved_config(cfg))
        if differences:
            shown = "; ".join(differences[:12]) + ("; ..." if len(differences) > 12 else "")
            raise RunDirectoryInUseError(
                f"{run_dir} already holds a run with a different config ({shown}). Restart it with the "
                "same command to resume it, choose a new directory with hydra.run.dir=<path> (the "
                "default is time-stamped; resume=<checkpoint> starts from another run's weights), "
                "or remove the old one yourself."
            )
        removed = remove_partial_saves(checkpoints)
        if removed:
            print(f"removed {len(removed)} partial file(s) of an interrupted checkpoint save",
                  file=sys.stderr)
        latest = latest_checkpoint(checkpoints) if checkpoints.is_dir() else None
        if latest is not None:
            print(f"resuming the run in {run_dir} from {latest} (step {checkpoint_step(latest)})",
                  file=sys.stderr)
            return latest
        print(f"restarting the run in {run_dir} from the start: it wrote no checkpoint", file=sys.stderr)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(recorded_config(cfg)))
    return Path(cfg.resume) if cfg.get("resume") else None


def resume_command(overrides: list[str], run_dir: Path) -> str:
    """The command that continues the run in `run_dir`: its overrides, in its directory.

    The same config in the same directory resumes from the newest checkpoint there (prepare_run_dir).
    Secret values are left out of the printed line (pass them again, or through the environment).
    """
    kept = [o for o in overrides if not o.lstrip("+~").startswith("hydra.run.dir=")
            and not is_secret_name(o.partition("=")[0].lstrip("+~").rsplit(".", 1)[-1])]
    where = Path(run_dir)
    try:
        where = where.resolve().relative_to(Path.cwd())
    except ValueError:
        pass
    return shlex.join(["python", "-m", "ssl.pretrain", *kept, f"hydra.run.dir={where}"])


def finished_result(run_dir: Path, cfg: DictConfig) -> dict | None:
    """What an earlier run of this same config in `run_dir` reported when it finished, else None.

    Rerunning a multirun grid (or the same command) then skips the finished runs instead of
    loading their last checkpoint, exporting and evaluating again. A different config there is
    not "finished": prepare_run_dir refuses it with the keys that differ.
    """
    path, config = run_dir / RESULT_FILE, run_dir / "config.yaml"
    if not path.is_file() or not config.is_file():
        return None
    if config_differences(OmegaConf.to_container(OmegaConf.load(config)), resolved_config(cfg)):
        return None
    return json.loads(path.read_text())


def write_result(run_dir: Path, result: dict) -> Path:
    """Mark the run finished (see finished_result); the file also holds its paths and k-NN."""
    path = run_dir / RESULT_FILE
    path.write_text(json.dumps(result, indent=2, default=float) + "\n")
    return path


def recorded_config(cfg: DictConfig) -> dict:
    """The resolved config as a run records it (config.yaml, logger, checkpoints): secrets as ***."""
    return redact(OmegaConf.to_container(cfg, resolve=True))


def wandb_run_id(run_dir: Path) -> str:
    """The run directory's wandb run id (created once): a resumed run logs into the same wandb run."""
    path = run_dir / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # wandb ids: letters and digits
    if not launched_as_worker_rank():
        path.write_text(run_id + "\n")
    return run_id


def redact_sweep_config() -> None:
    """Hydra's multirun writes the whole config, secrets included, to <sweep dir>/multirun.yaml."""
    if launched_as_worker_rank() or not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:
        redact_yaml_file(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
