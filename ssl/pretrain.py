"""`python -m ssl.pretrain objective=dino backbone=vit_s`: compose, check, build, fit, export.

Everything that can be checked cheaply (backbone name, data on disk, objective x backbone, run
directory) is checked before the first batch, each failure with one message saying what to do.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset

from ssl.backbones.acceleration import compile_backbone, use_channels_last, wants_channels_last
from ssl.backbones.factory import build_backbone, check_backbone_name, is_vit_name
from ssl.callbacks.attention_maps import AttentionMaps
from ssl.callbacks.graceful_stop import INTERRUPTED_EXIT_STATUS, GracefulStop, RunInterrupted
from ssl.callbacks.online_knn import OnlineKNN
from ssl.callbacks.online_linear import OnlineLinearProbe
from ssl.callbacks.progress import LazyProgressBar
from ssl.callbacks.reconstructions import ReconstructionGrid, can_reconstruct
from ssl.callbacks.rng_state import RNGStateCheckpoint
from ssl.callbacks.run_clock import RunClock
from ssl.callbacks.skipped_images import SkippedImages
from ssl.checkpointing.atomic_io import AtomicCheckpointIO
from ssl.checkpointing.metrics_csv import csv_logger
from ssl.checkpointing.pruning import PrunedCheckpoints
from ssl.checkpointing.resume import checkpoint_step
from ssl.composite import (
    drop_unselected_objective_settings,
    head_optim_settings,
    objective_weights,
    resolve_optimizer_recipe,
)
from ssl.config import CONFIG_DIR
from ssl.data.datamodule import PretrainDataModule, merge_view_specs
from ssl.data.datasets import build_dataset
from ssl.data.labelled_split import SPLIT_FILE, dataset_labels, write_split
from ssl.data.mixed_labels import labelled_pretrain_set
from ssl.data.shard_urls import quote_url_overrides
from ssl.errors import IncompatibleConfigError
from ssl.export import export_backbone
from ssl.module import SSLModule
from ssl.objectives import OBJECTIVES, build_objective
from ssl.optim.nonfinite import NonFiniteLossError
from ssl.redaction import redact_overrides
from ssl.run_dir import (
    RESULT_FILE,
    finished_result,
    launched_as_worker_rank,
    prepare_run_dir,
    recorded_config,
    redact_sweep_config,
    resume_command,
    wandb_run_id,
    write_result,
)
from ssl.sharding import (
    BlockShardedStrategy,
    full_state_dict,
    transformer_blocks,
    uses_block_sharding,
)
from ssl.teacher import separate_teachers_note, teacher_groups
from ssl.visualize.attention import has_cls_attention

# PretrainDataModule saves and restores its position inside an epoch itself (ResumableSampler),
# which Lightning's check for a stateful DataLoader cannot see.
warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")


def build_logger(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> Any:
    """csv | wandb (offline unless logger.mode=online; one wandb run per run directory) | none."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        return csv_logger(run_dir, resume_step if not launched_as_worker_rank() else None)
    if name == "wandb":
        if cfg.logger.get("api_key"):  # used from the environment, recorded nowhere
            os.environ["WANDB_API_KEY"] = str(cfg.logger.api_key)
        logger = pl.loggers.WandbLogger(
            save_dir=str(run_dir), project=cfg.logger.project, entity=cfg.logger.entity,
            tags=list(cfg.logger.tags), group=cfg.logger.group, mode=cfg.logger.mode,
            log_model=cfg.logger.log_model, id=wandb_run_id(run_dir), resume="allow",
        )
        logger.log_hyperparams(recorded_config(cfg))
        return logger
    raise ValueError(f"unknown logger '{name}'; valid: csv, wandb, none")


def default_precision() -> str:
    """bf16 autocast on GPUs that support it, float32 elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def build_checkpointing(cfg: DictConfig, run_dir: Path) -> PrunedCheckpoints:
    """Periodic checkpoints (every N epochs, or every N steps when set) plus last.ckpt.

    `checkpoint.keep_last`: how many periodic files to keep (the newest by step; null keeps all);
    last.ckpt is rewritten at every save and at each epoch end, and is always kept.
    """
    settings = cfg.checkpoint
    every_steps = settings.get("every_n_train_steps")
    keep = settings.get("keep_last")
    return PrunedCheckpoints(
        dirpath=str(run_dir / "checkpoints"),
        filename="epoch{epoch:03d}-step{step:07d}",
        auto_insert_metric_name=False,
        every_n_epochs=None if every_steps else settings.every_n_epochs,
        every_n_train_steps=every_steps,
        monitor="step",
        mode="max",
        save_top_k=-1 if keep is None else int(keep),
        save_last=True,
    )


def build_trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[pl.Callback], resume_step: int | None = None
) -> pl.Trainer:
    """`resume_step`: the step an interrupted run in `run_dir` continues from (its logs are kept)."""
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    if trainer_args.get("precision") is None:
        trainer_args["precision"] = default_precision()
    if uses_block_sharding(cfg.trainer):
        trainer_args["strategy"] = BlockShardedStrategy()
    log_every = trainer_args.get("log_every_n_steps") or 50
    clock = RunClock()
    if trainer_args.get("enable_progress_bar") is not False and not trainer_args.get("barebones"):
        # Refreshed as often as the module reads the loss from the device (see LazyProgressBar).
        callbacks = [LazyProgressBar(refresh_rate=log_every, clock=clock), *callbacks]
    return pl.Trainer(
        **trainer_args,
        default_root_dir=str(run_dir),
        logger=build_logger(cfg, run_dir, resume_step),
        callbacks=[build_checkpointing(cfg, run_dir), GracefulStop(run_dir / "checkpoints", log_every),
                   RNGStateCheckpoint(), clock, *callbacks],
        plugins=[AtomicCheckpointIO()],
    )


def resolve_drop_path_rate(cfg: DictConfig) -> None:
    """backbone.drop_path_rate=null: the objectives' recipe (the largest, for a combination).

    DINO trains its ViTs with stochastic depth 0.1, MAE and MFM without; CNNs get none. The
    resolved value is written into the config, so the run directory records it.
    """
    if cfg.backbone.get("drop_path_rate") is not None:
        return
    rates = [OBJECTIVES[name].recipe_drop_path_rate for name in cfg.objective if name in OBJECTIVES]
    cfg.backbone.drop_path_rate = max(rates, default=0.0) if is_vit_name(cfg.backbone.name) else None


def resolve_num_samples(cfg: DictConfig, num_samples: int | None) -> None:
    """objective.<name>.num_samples=null: the pretraining set's size (CoKe's label memory rows).

    Written into the config, so the run directory and the checkpoint record it.
    """
    if num_samples is None:
        return
    for obj_cfg in cfg.objective.values():
        if "num_samples" in obj_cfg and obj_cfg.num_samples is None:
            obj_cfg.num_samples = int(num_samples)


def resolve_num_classes(cfg: DictConfig, dataset: Dataset) -> None:
    """objective.<name>.num_classes=null (dataset.num_classes unset, e.g. imagefolder): the
    pretraining set's class count (its class folders), written into the config."""
    count = getattr(dataset, "num_classes", None)
    for obj_cfg in cfg.objective.values():
        if "num_classes" in obj_cfg and obj_cfg.num_classes is None and count:
            obj_cfg.num_classes = int(count)


def check_labels(cfg: DictConfig, dataset: Dataset) -> None:
    """An objective that reads labels (supervised) needs labelled images in the pretraining set."""
    needing = [name for name in cfg.objective if name in OBJECTIVES and OBJECTIVES[name].needs_labels]
    if not needing:
        return
    try:
        labelled = int((dataset_labels(dataset) >= 0).sum())
    except ValueError:
        labelled = 0
    if not labelled:
        raise IncompatibleConfigError(
            f"objective {', '.join(needing)} needs labelled images, and the pretraining set of "
            f"{cfg.dataset.name} has none (an unlabelled split, or a flat folder): use a labelled dataset "
            "(imagefolder: class sub-folders in dataset.root, more images in dataset.unlabelled_root), "
            "or leave the objective out"
        )


def resolve_sync_batchnorm(trainer_cfg: DictConfig, objectives: Any) -> bool:
    """trainer.sync_batchnorm=null: the recipe's choice (CoKe converts the model to SyncBN) on GPUs.

    torch's SyncBatchNorm runs on CUDA only, so CPU runs (gloo DDP included) keep plain BatchNorm;
    on one device the setting does nothing either way.
    """
    on_gpu = torch.cuda.is_available() and trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda")
    return on_gpu and any(o.recipe_sync_batchnorm for o in objectives)


def build_module(cfg: DictConfig, num_samples: int | None = None) -> SSLModule:
    """The training module; `num_samples` (the dataset size) fills in `num_samples: null`.

    Several objectives (`objective=[dino,mfm]`) share the backbone, and one EMA teacher when their
    teacher settings agree (else one each: ssl/teacher.py); each keeps its weight, heads, state and
    head optimiser settings (ssl/composite.py).
    """
    # First: a preset's leftover node for another objective would otherwise count as one below.
    for note in drop_unselected_objective_settings(cfg, OBJECTIVES):
        if not launched_as_worker_rank():
            print(f"ssl.pretrain: {note}", file=sys.stderr)
    resolve_optimizer_recipe(cfg, CONFIG_DIR)
    resolve_drop_path_rate(cfg)
    resolve_num_samples(cfg, num_samples)
    backbone = build_backbone(cfg.backbone)
    if wants_channels_last(cfg.backbone.get("channels_last"), backbone):
        use_channels_last(backbone)  # before the teacher copies it
    objectives = {
        name: build_objective(name, obj_cfg, backbone)
        for name, obj_cfg in cfg.objective.items()
    }
    weights = objective_weights(cfg.objective)
    if cfg.get("trainer") is not None and cfg.trainer.get("sync_batchnorm") is None:
        cfg.trainer.sync_batchnorm = resolve_sync_batchnorm(cfg.trainer, objectives.values())
    guard = cfg.get("guard") or {}
    module = SSLModule(
        backbone, objectives, weights, cfg.optimizer, cfg.data.batch_size,
        config=recorded_config(cfg),
        max_consecutive_nonfinite=guard.get("max_consecutive_nonfinite", 20),
        head_optim=head_optim_settings(cfg.objective),
    )
    if cfg.backbone.get("compile"):  # after the teachers' copies: each backbone compiles its own
        teachers = [teacher["backbone"] for teacher in module.ema_teachers().values()]
        for net in {id(b): b for b in (module.backbone, *teachers)}.values():
            compile_backbone(net)
    return module


def build_online_linear(cfg: DictConfig, module: SSLModule, eval_sets: tuple | None) -> OnlineLinearProbe:
    """The optional online linear probe; it needs labels in the pretraining and test splits."""
    eval_sets = eval_sets or OnlineKNN.labelled_eval_sets(cfg.dataset)
    if eval_sets is None or not cfg.dataset.get("num_classes"):
        raise ValueError(
            f"online_linear.enabled=true needs labelled train and test splits; {cfg.dataset.name} has none. "
            "Set online_linear.enabled=false."
        )
    settings = cfg.online_linear
    return OnlineLinearProbe(
        module.backbone.embed_dim, int(cfg.dataset.num_classes), cfg.dataset, eval_sets[1],
        settings.every_n_epochs, settings.lr, settings.momentum, settings.max_test_samples,
        cfg.knn.batch_size, cfg.knn.num_workers,
    )


def build_datamodule(
    cfg: DictConfig, module: SSLModule, dataset: Dataset | None = None
) -> PretrainDataModule:
    """The train loader's data module: the views and masks the module's objectives ask for, with
    the `data.*` settings. `dataset`: the already built pretrain split (None: built on setup)."""
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    maskers = [m for o in module.objectives.values() for m in o.batch_maskers()]
    return PretrainDataModule(
        cfg.dataset, views, cfg.data.batch_size, cfg.data.num_workers, dataset=dataset, maskers=maskers,
        seed=cfg.seed, augment_on=cfg.data.get("augment_on", "cpu"),
        prefetch_factor=cfg.data.get("prefetch_factor", 2), crop_on=cfg.data.get("crop_on", "worker"),
        labelled_per_batch=cfg.data.get("labelled_per_batch"),
    )


@dataclass
class PreparedRun:
    module: SSLModule
    data: PretrainDataModule
    trainer: pl.Trainer | None  # None when the run has already finished
    knn: OnlineKNN | None
    resume: Path | None = None  # the checkpoint to continue from (auto-resume or `resume=`)
    finished: dict | None = None  # the result a finished run of this config wrote (nothing to train)


def prepare(cfg: DictConfig) -> PreparedRun:
    """Every check and build that can fail on bad input, before the first batch."""
    run_dir = Path(cfg.run_dir)
    check_backbone_name(cfg.backbone.name)
    dataset = build_dataset(cfg.dataset, "pretrain")  # fails now, with advice, if data is missing
    # dataset.labelled_*: labels of the chosen subset only (as recorded, when the run resumes).
    dataset, split = labelled_pretrain_set(cfg.dataset, dataset, cfg.seed, run_dir)
    check_labels(cfg, dataset)
    resolve_num_classes(cfg, dataset)
    pl.seed_everything(cfg.seed, workers=True)
    module = build_module(cfg, num_samples=len(dataset))
    if len(module.teachers) and not launched_as_worker_rank():
        print(f"ssl.pretrain: {separate_teachers_note(teacher_groups(module.objectives))}", file=sys.stderr)
    sharded = uses_block_sharding(cfg.trainer)
    if sharded:
        transformer_blocks(module.backbone)  # FSDP needs a ViT: fail now, not in every rank
    data = build_datamodule(cfg, module, dataset)
    finished = finished_result(run_dir, cfg)
    if finished is not None:
        return PreparedRun(module, data, trainer=None, knn=None, finished=finished)
    # Only once every check has passed: a failed start leaves no run.
    resume = prepare_run_dir(run_dir, cfg)
    if split is not None and not launched_as_worker_rank() and not (run_dir / SPLIT_FILE).exists():
        write_split(str(run_dir / SPLIT_FILE), split, dataset_labels(dataset.dataset))
    knn = None
    eval_sets = OnlineKNN.labelled_eval_sets(cfg.dataset) if cfg.knn.enabled else None
    if eval_sets is not None:
        knn = OnlineKNN(
            cfg.dataset, eval_sets, cfg.knn.every_n_epochs, cfg.knn.k, cfg.knn.temperature,
            cfg.knn.max_train_samples, cfg.knn.max_test_samples, cfg.knn.batch_size,
            cfg.knn.num_workers,
        )
    callbacks: list[pl.Callback] = [SkippedImages(), *([knn] if knn else [])]  # unreadable files, per epoch
    if cfg.online_linear.enabled:
        callbacks.append(build_online_linear(cfg, module, eval_sets))
    if sharded and (cfg.reconstructions.enabled or cfg.attention_maps.enabled):
        print("ssl.pretrain: trainer.strategy=fsdp: reconstruction and attention-map pictures are off "
              "(they run on rank 0 alone, and sharded blocks need every rank).", file=sys.stderr)
    reconstructs = any(can_reconstruct(o) for o in module.objectives.values())
    if not sharded and cfg.reconstructions.enabled and reconstructs:
        callbacks.append(ReconstructionGrid(
            dataset, cfg.dataset, run_dir / "reconstructions", cfg.reconstructions.every_n_epochs,
            cfg.reconstructions.num_images,
        ))
    if not sharded and cfg.attention_maps.enabled and has_cls_attention(module.eval_backbone()):
        callbacks.append(AttentionMaps(
            dataset, cfg.dataset, run_dir / "attention", cfg.attention_maps.every_n_epochs,
            cfg.attention_maps.num_images, cfg.attention_maps.keep,
        ))
    in_place = resume is not None and resume.parent == run_dir / "checkpoints"
    trainer = build_trainer(cfg, run_dir, callbacks, checkpoint_step(resume) if in_place else None)
    return PreparedRun(module, data, trainer, knn, resume)


def command_overrides() -> list[str]:
    """This run's command-line overrides (none when composed outside `python -m ssl.pretrain`)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def fit(cfg: DictConfig, prepared: PreparedRun) -> dict[str, Any]:
    """Train, export the backbone, report the final k-NN; returns paths and numbers.

    A run that reaches its end writes result.json (an interrupted one does not), so the same
    command, or the multirun grid it belongs to, does not train it again."""
    module, trainer, knn = prepared.module, prepared.trainer, prepared.knn
    assert trainer is not None
    resume = str(prepared.resume) if prepared.resume is not None else None
    run_dir = Path(cfg.run_dir)
    try:
        trainer.fit(module, datamodule=prepared.data, ckpt_path=resume)
    except RunInterrupted as stop:  # Ctrl-C (ssl/callbacks/graceful_stop.py)
        if trainer.is_global_zero:
            print(f"ssl.pretrain: stopped at step {stop.step} (Ctrl-C); checkpoint: {stop.checkpoint}. "
                  f"Resume with: {resume_command(command_overrides(), run_dir)}", file=sys.stderr, flush=True)
        sys.exit(INTERRUPTED_EXIT_STATUS)
    result: dict[str, Any] = {"run_dir": str(run_dir)}
    if cfg.export.enabled:
        which = cfg.export.which
        source = "teacher" if which == "teacher" and module.teacher is not None else "student"
        backbone = module.eval_backbone(which)
        # Sharded blocks are gathered by every rank together; rank 0 writes.
        state = full_state_dict(backbone.model) if module.sharded else None
        if trainer.is_global_zero:
            path = export_backbone(backbone, run_dir / "backbone", source=source, state=state)
            result["backbone"] = str(path)
            print(f"exported backbone: {path}")
    if knn is not None and knn.last and trainer.is_global_zero:
        result["knn"] = knn.last
        print(f"k-NN (k={cfg.knn.k}, T={cfg.knn.temperature}) on {cfg.dataset.name} test: "
              f"top-1 {knn.last['top1']:.2f}%  top-5 {knn.last['top5']:.2f}%")
    if trainer.is_global_zero:
        write_result(run_dir, result)
        print(f"run directory: {run_dir}")
    return result


def run(cfg: DictConfig) -> dict[str, Any]:
    """Pretrain with a composed config. Bad input exits with one message, not a traceback;
    so does a run that diverged (exit status 3)."""
    sys.argv[:] = redact_overrides(sys.argv)  # composed already; wandb records the command line
    redact_sweep_config()
    try:
        prepared = prepare(cfg)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"ssl.pretrain: error: {error}", file=sys.stderr)
        sys.exit(2)
    if prepared.finished is not None:
        print(f"ssl.pretrain: {cfg.run_dir} already holds this run, finished: nothing to train "
              f"(its results are in {RESULT_FILE}; remove that file to train it again).", file=sys.stderr)
        return prepared.finished
    try:
        return fit(cfg, prepared)
    except NonFiniteLossError as error:
        print(f"ssl.pretrain: error: {error}", file=sys.stderr)
        sys.exit(3)


@hydra.main(config_path=CONFIG_DIR, config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    sys.argv[:] = quote_url_overrides(sys.argv)  # `dataset.urls=.../train-{000000..000099}.tar` as typed
    sys.exit(main())
