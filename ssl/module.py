"""SSLModule: one backbone, a weighted set of objectives, their EMA teacher(s).

Generic on purpose: it knows nothing method-specific. Per optimizer step it sums the objectives'
weighted losses, steps the optimizer (with this step's lr / weight decay, after clipping and the
objectives' pre-step hooks) and updates each teacher once (so gradient accumulation is handled), and
logs the objectives' metrics under their own names.

Teachers: objectives with equal `TeacherSpec`s share one (every single objective, [dino,mfm],
[mae,data2vec2]). The first teacher-based objective's teacher is `teacher` (state-dict keys
`teacher.module.*`); it is the one evaluation, k-NN, attention maps and export use. A combination
whose objectives ask for other settings (objective=[dino,data2vec]) keeps one more teacher per
distinct spec in `teachers`, keyed by that group's first objective (`teachers.data2vec.module.*`),
each with its own momentum schedule (logged as `teacher_momentum/<key>`), mode and buffer policy.

The rest lives beside it: whether a step is applied (non-finite losses or gradients, fp16
overflows; counted, and too many in a row stop the run) is `StepGate` (ssl/optim/step_gate.py);
the per-step schedules are `training_schedules` (ssl/optim/schedules.py); the teachers and the
grouping of objectives by teacher settings are in ssl/teacher.py.

The step has no host-device sync: the gate decides on the device where it can (the optimizer's
`found_inf`, a gated EMA), metrics are logged as device tensors, and the host reads the gate's
counters and the progress bar's loss once every `trainer.log_every_n_steps` steps (`read_guard`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from ssl.backbones.base import Backbone
from ssl.composite import HeadOptim
from ssl.data.spec import INDEX
from ssl.objectives.base import Objective, StepContext
from ssl.optim.clipping import clip_gradients
from ssl.optim.factory import build_optimizer, default_no_weight_decay, split_weight_decay
from ssl.optim.nonfinite import DeviceCounters, NonFiniteGuard
from ssl.optim.schedules import training_schedules
from ssl.optim.step_gate import StepGate
from ssl.sharding import average_replicated_gradients, is_sharded, shard_modules, transformer_blocks
from ssl.teacher import EMATeacher, teacher_groups


def objective_groups(name: str, objective: Objective, settings: HeadOptim) -> list[dict]:
    """One objective's own parameters as its own groups (decayed / exempt), tagged with its name.

    They follow the recipe's lr times `settings.lr_scale`; the decayed group follows the recipe's
    weight-decay schedule unless `settings.weight_decay` fixes it.
    """
    groups = split_weight_decay(objective.named_parameters(), objective.no_weight_decay)
    for group in groups:
        group["objective"] = name
        group["lr_scale"] = settings.lr_scale
        if group["apply_weight_decay"] and settings.weight_decay is not None:
            group["fixed_weight_decay"] = True  # still decayed (LARS adapts it), not scheduled
            group["weight_decay"] = settings.weight_decay
    return groups


class SSLModule(pl.LightningModule):
    def __init__(
        self,
        backbone: Backbone,
        objectives: Mapping[str, Objective],
        weights: Mapping[str, float],
        optimizer: Any,
        batch_size: int,
        config: dict | None = None,
        max_consecutive_nonfinite: int | None = 20,
        head_optim: Mapping[str, HeadOptim] | None = None,
    ) -> None:
        super().__init__()
        if config is not None:
            self.save_hyperparameters({"config": config})
        self.backbone = backbone
        self.objectives = nn.ModuleDict(dict(objectives))
        self.weights = dict(weights)
        self.optim_cfg = optimizer
        self.head_optim = dict(head_optim or {})
        self.batch_size = batch_size
        for objective in self.objectives.values():
            objective.check_backbone(backbone)
            objective.prepare_backbone(backbone)
        groups = teacher_groups(self.objectives)
        # objective name -> the key of the teacher it uses (its group's first objective)
        self.teacher_keys = {name: group.key for group in groups for name in group.objectives}
        self.first_teacher_key = groups[0].key if groups else None
        self.teacher = EMATeacher(self.mirrored_by_teacher(), groups[0].spec) if groups else None
        # Empty unless specs differ, so single teachers keep their state-dict keys and checkpoints.
        self.teachers = nn.ModuleDict(
            {g.key: EMATeacher(self.mirrored_by_teacher(g.key), g.spec) for g in groups[1:]}
        )
        self.schedules: dict[str, np.ndarray] = {}
        self.sharded = False
        self.gate = StepGate(max_consecutive_nonfinite)
        self.progress_metrics: dict[str, float] = {}  # host values for the progress bar, per read
        self._last_loss: torch.Tensor | None = None
        self._schedule_tensors: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    @property
    def guard(self) -> NonFiniteGuard:
        """The host's counters of skipped steps (exact after each `read_guard`)."""
        return self.gate.guard

    @property
    def device_guard(self) -> DeviceCounters | None:
        """The device counters, when the skip is decided on the device (else None)."""
        return self.gate.counters

    def configure_model(self) -> None:
        """`trainer.strategy=fsdp` (a device mesh from Lightning): shard the blocks with FSDP2.

        The student's blocks (backbone, then heads the objectives offer) and their copies in every
        teacher, so each EMA stays an update of local shards.
        """
        if self.device_mesh is None or self.sharded:
            return
        blocks = transformer_blocks(self.backbone)
        blocks += [block for objective in self.objectives.values() for block in objective.sharded_blocks()]
        wanted = {id(block) for block in blocks}
        for key, teacher in self.ema_teachers().items():
            pairs = zip(self.mirrored_by_teacher(key).modules(), teacher.module.modules())
            blocks += [copy for original, copy in pairs if id(original) in wanted]
        shard_modules(blocks, self.device_mesh, root=self)
        self.sharded = True

    def mirrored_by_teacher(self, key: str | None = None) -> nn.ModuleDict:
        """The student parts a teacher averages: backbone plus heads its objectives ask for.

        `key`: the teacher (its group's first objective); None is the first teacher.
        """
        key = key or self.first_teacher_key
        parts: dict[str, nn.Module] = {"backbone": self.backbone}
        for name, objective in self.objectives.items():
            mirrored = key is not None and self.teacher_keys.get(name) == key
            head = objective.teacher_heads() if mirrored else None
            if head is not None:
                parts[name] = head
        return nn.ModuleDict(parts)

    def ema_teachers(self) -> dict[str, EMATeacher]:
        """Every EMA teacher by key: the first (`teacher`), then the extras (`teachers`)."""
        first = {self.first_teacher_key: self.teacher} if self.teacher is not None else {}
        return {**first, **dict(self.teachers.items())}

    def teacher_for(self, name: str) -> EMATeacher | None:
        """Objective `name`'s own teacher; objectives without one get the first (None if none)."""
        key = self.teacher_keys.get(name)
        return self.teachers[key] if key in self.teachers else self.teacher

    def momentum_name(self, key: str) -> str:
        """The schedule (and, with "teacher_" in front, the log) name of a teacher's momentum."""
        return "momentum" if key == self.first_teacher_key else f"momentum/{key}"

    # ----------------------------------------------------------------------------- optimizer
    def configure_optimizers(self) -> torch.optim.Optimizer:
        objectives = list(self.objectives.values())

        def backbone_exempt(name: str, param: nn.Parameter) -> bool:
            return default_no_weight_decay(name, param) or any(
                o.backbone_no_weight_decay(name, param) for o in objectives
            )

        named = [(f"backbone.{n}", p) for n, p in self.backbone.named_parameters()]
        groups = split_weight_decay(named, backbone_exempt)
        for name, objective in self.objectives.items():
            groups += objective_groups(
                name, objective, self.head_optim.get(name, HeadOptim())
            )
        if self.sharded:  # optimizers' foreach kernels take sharded or plain tensors, not a mix
            groups = [
                {**g, "params": [p for p in g["params"] if is_sharded(p) == sharded]}
                for g in groups for sharded in (True, False)
            ]
        groups = [g for g in groups if g["params"]]
        return build_optimizer(groups, self.optim_cfg)

    def global_batch_size(self) -> int:
        accumulate = self.trainer.accumulate_grad_batches if self._trainer else 1
        world = self.trainer.world_size if self._trainer else 1
        return self.batch_size * world * accumulate

    def build_schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step lr, weight decay and teacher momentum for this run (`training_schedules`)."""
        spec = self.teacher.spec if self.teacher is not None else None
        extras = {key: teacher.spec for key, teacher in self.teachers.items()}
        batch = self.global_batch_size()
        return training_schedules(self.optim_cfg, batch, total_steps, steps_per_epoch, spec, extras)

    def on_train_start(self) -> None:
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        batches = self.trainer.num_training_batches
        steps_per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        if not math.isfinite(batches):
            steps_per_epoch = total
        self.schedules = self.build_schedules(total, steps_per_epoch)

    def scheduled(self, name: str) -> float:
        values = self.schedules[name]
        return float(values[min(self.global_step, len(values) - 1)])

    def scheduled_tensor(self, name: str) -> torch.Tensor:
        """`scheduled(name)` as a 0-dim device tensor, to log without a sync.

        Logging a float copies it to the device (a blocking copy); the schedule is copied once
        instead, and indexing it is a view.
        """
        values = self.schedules[name]
        cached = self._schedule_tensors.get(name)
        if cached is None or cached[0] is not values or cached[1].device != self.device:
            cached = (values, torch.as_tensor(values, dtype=torch.float32, device=self.device))
            self._schedule_tensors[name] = cached
        return cached[1][min(self.global_step, len(values) - 1)]

    def context(self) -> StepContext:
        return StepContext(
            epoch=self.current_epoch, step=self.global_step,
            max_epochs=self.trainer.max_epochs if self._trainer else 1,
        )

    # ----------------------------------------------------------------------------- step
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        for teacher in self.ema_teachers().values():
            teacher.follow_mode_policy(self.backbone.training)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        ctx = self.context()
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            teacher = self.teacher_for(name)
            out = objective.loss(batch, self.backbone, teacher.module if teacher is not None else None, ctx)
            total = total + self.weights.get(name, 1.0) * out.loss
            logs[f"{name}/loss"] = out.loss.detach()
            for key, value in out.metrics.items():
                logs[f"{name}/{key}"] = value
        self.gate.observe_loss(total)
        self._last_loss = total.detach()
        batch_size = len(batch[INDEX])
        # No prog_bar=True: Lightning turns those into Python numbers after every batch (a sync);
        # the progress bar shows `progress_metrics` instead (ssl/callbacks/progress.py).
        self.log("train/loss", total.detach(), batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        logged = {"lr": "lr", "weight_decay": "weight_decay"}
        momenta = [self.momentum_name(key) for key in self.ema_teachers()]
        logged.update({name: f"teacher_{name}" for name in momenta})
        for name, key in logged.items():
            if name in self.schedules:
                self.log(f"train/{key}", self.scheduled_tensor(name), batch_size=batch_size)
        return total

    def on_train_epoch_end(self) -> None:
        """Objectives' end-of-epoch updates; Lightning writes the epoch's checkpoint after this."""
        ctx = self.context()
        for name, objective in self.objectives.items():
            for key, value in objective.on_train_epoch_end(ctx).items():
                self.log(f"train/{name}/{key}", value, on_epoch=True, on_step=False)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Let the gate decide whether this step is applied, then clip (DINO: per parameter, after
        AMP unscaling) and run the objective hooks (DINO freeze) when it says so.

        Lightning calls this after backward (and after the fp16 scaler's unscaling), inside
        `optimizer.step`. The gate decides on the device for optimizers that skip themselves and
        no fp16 GradScaler, else on the host with one sync (ssl/optim/step_gate.py).
        """
        scaler = self.grad_scaler()
        self.gate.unscale(optimizer, scaler)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:  # FSDP2 reduced the blocks' gradients; the replicated rest is averaged here
            average_replicated_gradients(params)
        checkpoint = self.newest_checkpoint()
        if self.gate.decide(optimizer, params, self.global_step, self.device, scaler, checkpoint):
            self.clip_and_run_hooks(params)
        for key, value in self.gate.metrics().items():
            self.log(key, value)

    def clip_and_run_hooks(self, params: list[nn.Parameter]) -> None:
        """Gradient clipping, then the objectives' pre-step hooks (DINO's last-layer freeze)."""
        clip_gradients(params, self.optim_cfg.clip_grad, self.optim_cfg.clip_mode)
        ctx = self.context()
        for objective in self.objectives.values():
            objective.before_optimizer_step(ctx)

    def newest_checkpoint(self) -> str | None:
        """The newest periodic checkpoint written (else the one this run resumed from), or None.

        Called when a step's loss and gradients are finite: that checkpoint's weights trained on.
        `last.ckpt` is only a fallback, since it is overwritten by every later save.
        """
        if not self._trainer:
            return None
        callback = self.trainer.checkpoint_callback
        newest = (callback.best_model_path or callback.last_model_path) if callback else None
        return newest or self.trainer.ckpt_path

    def grad_scaler(self) -> Any:
        """The fp16 GradScaler of Lightning's precision plugin, or None (32-bit, bf16)."""
        return getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Set this step's lr / wd, step, then move each teacher (once per optimizer step).

        Teachers stay put when the step was skipped (non-finite, or an fp16 scaler overflow).
        Every `read_interval()` steps the host reads the device state (`read_guard`).
        """
        if self.schedules:
            lr, wd = self.scheduled("lr"), self.scheduled("weight_decay")
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if group.get("apply_weight_decay") and not group.get("fixed_weight_decay"):
                    group["weight_decay"] = wd
        self.gate.step(optimizer, optimizer_closure)
        if not self.gate.host_skipped:
            for key, teacher in self.ema_teachers().items():
                name = self.momentum_name(key)
                momentum = self.scheduled(name) if self.schedules else teacher.spec.momentum
                teacher.update(self.mirrored_by_teacher(key), momentum, skip=self.gate.device_skip)
        if self.gate.count_step(self.read_interval()):
            self.read_guard()

    def read_interval(self) -> int:
        """Optimizer steps between two host reads of the device state: `trainer.log_every_n_steps`."""
        return max(1, int(self.trainer.log_every_n_steps)) if self._trainer else 50

    def read_guard(self) -> None:
        """The host's look at the device state, in one copy (the only sync of the steps between).

        The guard's counters (raising `NonFiniteLossError` if the limit was reached since the last
        read) and the loss for the progress bar. Called every `read_interval()` steps, before every
        checkpoint save (so the last good checkpoint is known before pruning, and a run past its
        limit stops instead of saving) and at the end of training.
        """
        counters = self.gate.state()
        parts = [counters] if counters is not None else []
        if self._last_loss is not None:
            parts.append(self._last_loss.double().reshape(1))
        values = torch.cat(parts).tolist() if parts else []  # the one copy
        if self._last_loss is not None:
            self.progress_metrics = {"train/loss": values.pop()}
            if self.schedules:
                self.progress_metrics["train/lr"] = self.scheduled("lr")
        self.gate.read(values)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the guard before each save (see `read_guard`)."""
        self.read_guard()

    def on_train_end(self) -> None:
        """A limit reached in the last steps before the end still stops the run with its message."""
        self.read_guard()

    def eval_backbone(self, which: str = "teacher") -> Backbone:
        """The backbone evaluations use: the first teacher's when there is one (DINO's protocol)."""
        if which == "teacher" and self.teacher is not None:
            return self.teacher["backbone"]
        return self.backbone
