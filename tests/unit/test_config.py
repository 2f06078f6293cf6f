"""Config composition: every group option composes, the CLI contract holds, bad options fail."""

import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import REPO_ROOT
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from ssl.config import CONFIG_DIR

GROUPS = ["backbone", "objective", "optimizer", "dataset", "trainer", "logger", "experiment"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}", "run_dir=/tmp/x"])
    container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert container["backbone"]["name"] and container["objective"]
    if group == "objective":
        assert option in cfg.objective


def test_defaults_make_the_bare_command_work() -> None:
    cfg = compose_cfg([])
    assert cfg.backbone.name == "vit_small_patch16_224"
    assert list(cfg.objective) == ["dino"] and cfg.optimizer.name == "adamw"
    assert cfg.dataset.name == "fashion_mnist"
    assert cfg.backbone.img_size == 28 and cfg.backbone.patch_size == 4


def test_trainer_config_lists_every_trainer_argument() -> None:
    cfg = compose_cfg([])
    built_elsewhere = {"self", "logger", "callbacks", "plugins", "model_registry", "default_root_dir"}
    args = set(inspect.signature(pl.Trainer.__init__).parameters) - built_elsewhere
    assert args <= set(cfg.trainer), f"missing trainer args: {args - set(cfg.trainer)}"


def test_command_line_overrides_reach_their_targets() -> None:
    cfg = compose_cfg([
        "trainer.max_epochs=3", "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=4",
        "trainer.devices=2", "trainer.limit_train_batches=0.1", "data.batch_size=32",
        "data.num_workers=0", "optimizer.lr=1e-3", "objective.dino.local_crops=6",
        "dataset.local_crop_size=16", "+backbone.kwargs.depth=6", "logger=wandb",
    ])
    assert cfg.trainer.max_epochs == 3 and cfg.trainer.accumulate_grad_batches == 4
    assert cfg.data.batch_size == 32 and cfg.optimizer.lr == 1e-3
    assert cfg.objective.dino.local_crops == 6 and cfg.dataset.local_crop_size == 16
    assert cfg.backbone.kwargs.depth == 6 and cfg.logger.mode == "offline"


def test_experiment_quickstart_overrides_backbone() -> None:
    cfg = compose_cfg(["experiment=quickstart"])
    assert cfg.backbone.name == "vit_tiny_patch16_224"


@pytest.mark.parametrize("override", ["backbone=vit_x", "objective=nope", "dataset=mnist2"])
def test_unknown_group_option_lists_valid_ones(override: str) -> None:
    group = override.split("=")[0]
    with pytest.raises(MissingConfigException) as info:
        compose_cfg([override])
    for valid in options(group):
        assert valid in str(info.value)


def test_cfg_job_prints_the_composed_config() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssl.pretrain", "--cfg", "job", "backbone=resnet18"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    printed = OmegaConf.create(out.stdout)
    assert printed.backbone.name == "resnet18" and "dino" in printed.objective


def test_unknown_backbone_name_fails_before_training(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssl.pretrain", "backbone.name=resnet181", f"hydra.run.dir={tmp_path}/r"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "timm has no model named 'resnet181'" in out.stderr and "resnet18" in out.stderr
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_dataset_fails_with_instructions(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssl.pretrain", f"dataset.root={tmp_path}/nothing",
         f"hydra.run.dir={tmp_path}/r"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode != 0
    assert "apt-get install dataset-fashion-mnist" in out.stderr


def test_mae_on_a_resnet_fails_before_training_and_suggests_mfm(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ssl.pretrain", "objective=mae", "backbone=resnet18",
         f"hydra.run.dir={tmp_path}/r"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 2
    assert "MAE needs a ViT" in out.stderr and "objective=mfm" in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()  # the run directory holds no run


@pytest.mark.parametrize(
    ("objective", "rate"), [("dino", 0.1), ("data2vec", 0.25), ("mae", 0.0), ("mfm", 0.0)]
)
def test_drop_path_follows_the_objective_recipe(objective: str, rate: float) -> None:
    from ssl.pretrain import resolve_drop_path_rate

    cfg = compose_cfg([f"objective={objective}", "backbone=vit_t", "run_dir=/tmp/x"])
    assert cfg.backbone.drop_path_rate is None  # null: the recipe
    resolve_drop_path_rate(cfg)
    assert cfg.backbone.drop_path_rate == rate
    assert cfg.optimizer.name == "adamw"
    assert cfg.optimizer.betas[1] == (0.999 if objective in ("dino", "data2vec") else 0.95)
    explicit = compose_cfg([f"objective={objective}", "backbone=vit_t", "backbone.drop_path_rate=0.2"])
    resolve_drop_path_rate(explicit)
    assert explicit.backbone.drop_path_rate == 0.2
    resnet = compose_cfg([f"objective={objective}", "backbone=resnet18"])
    resolve_drop_path_rate(resnet)
    assert resnet.backbone.drop_path_rate is None
