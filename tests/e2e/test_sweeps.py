"""Sweeps and clusters: wandb sweep files, Hydra multirun, the SLURM launcher and Lightning's SLURM detection.

No test reaches the network: the sweep files are checked against wandb's documented structure and
composed with Hydra's API, the agent's argument formatting is wandb's own function, and the multirun
logs to CSV.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import yaml
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from hydra import compose, initialize_config_dir
from lightning_fabric.plugins.environments import SLURMEnvironment
from lightning_fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

from ssl.config import CONFIG_DIR
from ssl.run_dir import launched_as_worker_rank

SWEEP_DIR = Path(CONFIG_DIR) / "sweep"
SWEEP_FILES = sorted(SWEEP_DIR.glob("*.yaml"))
KNN_METRIC = "knn/top1"  # what OnlineKNN logs and what WandbLogger hands to wandb unchanged

# wandb's sweep configuration (docs: "Sweep configuration options"); the `sweeps` package that holds
# the JSON schema would downgrade numpy, so the documented structure is checked here.
TOP_LEVEL_KEYS = {
    "name", "description", "project", "entity", "program", "method", "metric", "parameters",
    "command", "early_terminate", "run_cap", "controller",
}
METHODS = {"grid", "random", "bayes"}
PARAMETER_KEYS = {"value", "values", "probabilities", "distribution", "min", "max", "mu", "sigma", "q"}
# distribution -> the keys it needs; min / max of the *_values kinds are the sampled values themselves.
DISTRIBUTIONS = {
    "constant": {"value"}, "categorical": {"values"}, "int_uniform": {"min", "max"},
    "uniform": {"min", "max"}, "q_uniform": {"min", "max"}, "log_uniform": {"min", "max"},
    "log_uniform_values": {"min", "max"}, "q_log_uniform": {"min", "max"},
    "q_log_uniform_values": {"min", "max"}, "inv_log_uniform": {"min", "max"},
    "inv_log_uniform_values": {"min", "max"}, "normal": set(), "q_normal": set(), "log_normal": set(),
    "q_log_normal": set(),
}
BOUNDED_BY_VALUES = {"uniform", "int_uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values"}
CONTINUOUS = {name for name in DISTRIBUTIONS if name not in ("constant", "categorical", "int_uniform")}
ENTRY = ["${env}", "${interpreter}", "-m", "ssl.pretrain"]


def load_sweep(path: Path) -> dict[str, Any]:
    """As `wandb sweep` reads it (yaml.safe_load: `5e-4` without a dot would be a string)."""
    return yaml.safe_load(path.read_text())


def sweep_violations(sweep: dict[str, Any]) -> list[str]:
    """Every way `sweep` departs from wandb's sweep structure or from what our agents need."""
    problems = [f"unknown top-level key '{k}'" for k in set(sweep) - TOP_LEVEL_KEYS]
    if sweep.get("method") not in METHODS:
        problems.append(f"method must be one of {sorted(METHODS)}")
    metric = sweep.get("metric") or {}
    if metric.get("name") != KNN_METRIC or metric.get("goal") != "maximize":
        problems.append(f"metric must be {{name: {KNN_METRIC}, goal: maximize}}, got {metric}")
    parameters = sweep.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        return [*problems, "parameters must be a non-empty mapping"]
    for name, spec in parameters.items():
        problems += [f"{name}: {p}" for p in parameter_violations(spec, sweep.get("method"))]
    command = sweep.get("command")
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        return [*problems, "command must be a list of strings"]
    if command[: len(ENTRY)] != ENTRY or command[-1] != "${args_no_hyphens}":
        problems.append(f"command must be {ENTRY} + fixed overrides + ['${{args_no_hyphens}}']")
    macros = [c for c in command if c.startswith("${") and c.endswith("}")]
    if macros != ["${env}", "${interpreter}", "${args_no_hyphens}"]:
        problems.append(f"unexpected agent macros {macros}")
    return problems


def parameter_violations(spec: Any, method: str | None) -> list[str]:
    if not isinstance(spec, dict):
        return ["must be a mapping"]
    problems = [f"unknown key '{k}'" for k in set(spec) - PARAMETER_KEYS]
    kinds = [k for k in ("value", "values", "distribution") if k in spec]
    if len(kinds) != 1:
        return [*problems, f"needs exactly one of value / values / distribution, has {kinds}"]
    if "values" in spec:
        values = spec["values"]
        if not isinstance(values, list) or not values:
            problems.append("values must be a non-empty list")
        elif "probabilities" in spec and (
            len(spec["probabilities"]) != len(values) or not math.isclose(sum(spec["probabilities"]), 1.0)
        ):
            problems.append("probabilities must match values and sum to 1")
    if "distribution" in spec:
        distribution = spec["distribution"]
        if distribution not in DISTRIBUTIONS:
            return [*problems, f"unknown distribution '{distribution}'"]
        missing = DISTRIBUTIONS[distribution] - set(spec)
        if missing:
            problems.append(f"{distribution} needs {sorted(missing)}")
        if {"min", "max"} <= set(spec):
            low, high = spec["min"], spec["max"]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
                problems.append(f"min / max must be numbers, got {low!r} / {high!r}")
            elif low >= high:
                problems.append("min must be below max")
            elif distribution.endswith("log_uniform_values") and low <= 0:
                problems.append("log_uniform_values needs min > 0")
            elif distribution == "int_uniform" and not (isinstance(low, int) and isinstance(high, int)):
                problems.append("int_uniform needs integer bounds")
        if method == "grid" and distribution in CONTINUOUS:
            problems.append("grid search cannot enumerate a continuous distribution")
    return problems


def sampled_points(spec: dict[str, Any]) -> list[Any]:
    """Values the agent can send: each listed value, or both ends of a bounded distribution."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    if spec["distribution"] in BOUNDED_BY_VALUES:
        return [spec["min"], spec["max"]]
    raise AssertionError(f"add the end points of '{spec['distribution']}' to sampled_points")


def fixed_overrides(sweep: dict[str, Any]) -> list[str]:
    """The Hydra overrides the sweep's command passes before the sampled ones."""
    return [c for c in sweep["command"][len(ENTRY):] if not c.startswith("${")]


def agent_argument(name: str, value: Any) -> str:
    """The exact `key=value` the wandb agent puts in ${args_no_hyphens}."""
    (argument,) = create_sweep_command_args({"args": {name: {"value": value}}})["args_no_hyphens"]
    return argument


def expected_value(value: Any) -> Any:
    """What the config should hold: Hydra reads a string like "[70,94,117]" as a list."""
    return yaml.safe_load(value) if isinstance(value, str) else value


def compose_sweep_run(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


SWEEP_PARAMETERS = [
    pytest.param(path, name, id=f"{path.stem}:{name}")
    for path in SWEEP_FILES for name in load_sweep(path)["parameters"]
]


def test_the_issue_sweeps_exist() -> None:
    assert {"dino", "mae", "coke", "mfm"} <= {p.stem for p in SWEEP_FILES}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_a_valid_wandb_sweep(path: Path) -> None:
    assert sweep_violations(load_sweep(path)) == []


def test_the_validator_rejects_what_wandb_rejects() -> None:
    good = load_sweep(SWEEP_DIR / "dino.yaml")
    broken = [
        {**good, "method": "hyperband"},
        {**good, "metric": {"name": "knn_top1", "goal": "maximize"}},
        {**good, "parameters": {"optimizer.lr": {"value": 1e-3, "values": [1e-3]}}},
        {**good, "parameters": {"optimizer.lr": {"distribution": "uniform", "min": "5e-4", "max": 0.1}}},
        {**good, "parameters": {"optimizer.lr": {"distribution": "log_uniform_values", "min": 0, "max": 1}}},
        {**good, "method": "grid"},
        {**good, "command": [c for c in good["command"] if c != "${args_no_hyphens}"]},
        {**good, "programme": "x.py"},
    ]
    for sweep in broken:
        assert sweep_violations(sweep), sweep


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_command_logs_online_to_the_sweeps_project_in_its_own_run_dir(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sweep = load_sweep(path)
    monkeypatch.setenv("WANDB_SWEEP_ID", "abc123")
    monkeypatch.setenv("WANDB_RUN_ID", "run42")
    cfg = compose_sweep_run(fixed_overrides(sweep))
    assert cfg.logger.name == "wandb" and cfg.logger.mode == "online"  # the controller needs the metric
    assert cfg.logger.project == sweep["project"]
    assert cfg.hydra.run.dir == "runs/sweeps/abc123/run42"


@pytest.mark.parametrize(("path", "name"), SWEEP_PARAMETERS)
def test_every_sweep_value_composes_into_its_config_key(path: Path, name: str) -> None:
    """Each value, formatted as the agent formats it, lands on an existing key (a typo fails here)."""
    sweep = load_sweep(path)
    base = fixed_overrides(sweep)
    for value in sampled_points(sweep["parameters"][name]):
        cfg = compose_sweep_run([*base, agent_argument(name, value)])
        composed = OmegaConf.select(cfg, name, throw_on_missing=True)
        if OmegaConf.is_config(composed):
            composed = OmegaConf.to_container(composed)
        assert composed == expected_value(value), (name, value, composed)
        OmegaConf.to_container(cfg.objective, resolve=True)
        OmegaConf.to_container(cfg.optimizer, resolve=True)


def test_list_values_reach_hydra_as_lists_in_both_forms() -> None:
    """The agent writes a YAML list as "[140, 187]" and a string as "[140,187]": Hydra reads both."""
    base = ["objective=coke"]
    for value in ([140, 187], "[140,187]"):
        cfg = compose_sweep_run([*base, agent_argument("objective.coke.num_clusters", value)])
        assert list(cfg.objective.coke.num_clusters) == [140, 187]


MULTIRUN_TINY = [
    "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.dino.out_dim=256",
    "objective.dino.hidden_dim=128", "objective.dino.local_crops=2", "data.batch_size=16",
    "data.num_workers=0", "trainer.limit_train_batches=2", "trainer.max_epochs=1",
    "knn.max_train_samples=200", "knn.max_test_samples=100", "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "attention_maps.enabled=false",
    "export.enabled=false", "logger=csv",
]


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_hydra_multirun_gives_each_configuration_its_own_run_directory(tmp_path: Path) -> None:
    """The offline twin of a sweep: `-m` runs both values, each in sweep_dir/<job number>."""
    sweep_dir = tmp_path / "multirun"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run(
        [sys.executable, "-m", "ssl.pretrain", "-m", "optimizer.lr=0.001,0.002", *MULTIRUN_TINY,
         f"hydra.sweep.dir={sweep_dir}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    lrs = []
    for job in ("0", "1"):
        run_dir = sweep_dir / job
        assert (run_dir / "checkpoints" / "last.ckpt").is_file()
        config = OmegaConf.load(run_dir / "config.yaml")
        assert config.run_dir == str(run_dir)
        lrs.append(config.optimizer.lr)
        header = (run_dir / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
        assert {load_sweep(p)["metric"]["name"] for p in SWEEP_FILES} <= set(header)  # what sweeps maximise
    assert lrs == [0.001, 0.002]


def has_submitit_launcher() -> bool:
    """The plugin is an optional dependency (`.[slurm]`, also in `.[dev]`)."""
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not has_submitit_launcher(), reason='needs pip install -e ".[slurm]" (hydra-submitit-launcher)'
)
def test_slurm_launcher_config_selects_submitit_with_one_task_per_gpu() -> None:
    cfg = compose_sweep_run([
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=8",
        "hydra.launcher.nodes=2", "hydra.launcher.timeout_min=600", "trainer.devices=8",
        "trainer.num_nodes=2", "trainer.strategy=ddp",
    ])
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["partition"] == "gpu" and launcher["nodes"] == 2 and launcher["timeout_min"] == 600
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 8  # one Lightning rank per GPU
    assert launcher["name"] not in ("bash", "interactive")  # SLURM_JOB_NAME Lightning would ignore
    assert cfg.trainer.devices == 8 and cfg.trainer.num_nodes == 2 and cfg.trainer.strategy == "ddp"


SLURM_RANK_2_OF_4 = {  # what srun sets in task 2 of `--nodes=2 --ntasks-per-node=2`
    "SLURM_JOB_ID": "123456", "SLURM_JOB_NAME": "pretrain", "SLURM_NTASKS": "4",
    "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "2", "SLURM_NODELIST": "gpu[07-08]",
    "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
}


@pytest.fixture
def slurm_task(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process looks like srun's task 2 of 4; everything is restored afterwards."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE",
                 "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "x")  # recorded, so whatever Lightning writes is undone afterwards
        monkeypatch.delenv(name)
    for name, value in SLURM_RANK_2_OF_4.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # a Trainer sets it to its rank


def test_lightning_picks_up_slurm_from_srun_variables(slurm_task: None) -> None:
    """Lightning builds its SLURMEnvironment from srun's variables; no process group is started."""
    assert SLURMEnvironment.detect()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, num_nodes=2, strategy="ddp", logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    environment = trainer.strategy.cluster_environment
    assert isinstance(environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size) == (2, 0, 1, 4)
    assert environment.main_address == "gpu07" and environment.main_port == 15000 + 3456
    assert not trainer.is_global_zero and launched_as_worker_rank()  # rank 0 alone prepares the run dir


def test_slurm_devices_must_match_tasks_per_node(slurm_task: None) -> None:
    """trainer.devices != hydra.launcher.tasks_per_node fails as fit starts, saying which to set."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, num_nodes=2, strategy="ddp", logger=False)
    with pytest.raises(ValueError, match="Set `devices=2`"):
        trainer.strategy.launcher.launch(lambda: None)  # fit's first step; raises before running anything
