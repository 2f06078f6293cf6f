"""SSLModule: one backbone, a weighted set of objectives, an optional shared EMA teacher.

Generic on purpose: it knows nothing method-specific. It sums the objectives' weighted losses,
owns the optimizer and the per-step lr / weight-decay / EMA-momentum schedules, clips gradients,
updates the teacher once per optimizer step (so gradient accumulation is handled), and logs the
objectives' metrics under their own names. A step whose loss or gradients are not finite is skipped
(weights, optimizer moments and teacher untouched) and counted; too many in a row stop the run
(ssl/optim/nonfinite.py).

The step has no host-device sync: the skip is decided on the device (the optimizer's `found_inf`,
a gated EMA), metrics are logged as device tensors, and the host reads the guard's counters and the
progress bar's loss once every `trainer.log_every_n_steps` steps (`read_guard`).
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
from ssl.distributed import all_reduce_sum
from ssl.errors import IncompatibleConfigError
from ssl.objectives.base import Objective, StepContext
from ssl.optim.clipping import clip_gradients
from ssl.optim.factory import build_optimizer, default_no_weight_decay, skips_on_device, split_weight_decay
from ssl.optim.nonfinite import DeviceCounters, NonFiniteGuard, all_finite
from ssl.optim.schedules import LR_SCHEDULES, cosine_schedule, frozen_then, momentum_schedule
from ssl.sharding import average_replicated_gradients, is_sharded, shard_modules, transformer_blocks
from ssl.teacher import EMATeacher, TeacherSpec


def lr_schedule(cfg: Any) -> Any:
    """`optimizer.lr_schedule`: cosine (DINO, MAE) or timm_cosine (MFM); unknown names list both."""
    name = cfg.get("lr_schedule", "cosine")
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown optimizer.lr_schedule '{name}'; valid: {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[name]


# Teacher settings a user can set per objective (objective.<name>.teacher.<field>); train_mode and
# buffers are fixed by each method.
ALIGNABLE_TEACHER_FIELDS = ("momentum", "momentum_end", "schedule", "ramp_steps")


def shared_teacher_spec(objectives: Mapping[str, Objective]) -> TeacherSpec | None:
    """The one teacher behaviour all teacher-based objectives agree on (or a clear error).

    There is one EMA teacher, so no rule could pick between two momentum schedules without
    silently changing one method: differing settings fail before training, naming the overrides.
    """
    specs = {name: obj.teacher_spec() for name, obj in objectives.items() if obj.needs_teacher}
    if not specs:
        return None
    if len(set(specs.values())) > 1:
        raise IncompatibleConfigError(teacher_mismatch_message(specs))
    return next(iter(specs.values()))


def teacher_mismatch_message(specs: Mapping[str, TeacherSpec]) -> str:
    """Which teacher fields differ, and the overrides that align them with the first objective."""
    names = list(specs)
    first = specs[names[0]]
    fields = [f for f in TeacherSpec.__dataclass_fields__
              if len({getattr(s, f) for s in specs.values()}) > 1]
    differ = "; ".join(
        f"teacher.{f}: " + ", ".join(f"{n}={getattr(s, f)}" for n, s in specs.items()) for f in fields
    )
    message = (
        f"objectives {', '.join(names)} share one EMA teacher but ask for different settings ({differ})."
    )
    fixed = [f for f in fields if f not in ALIGNABLE_TEACHER_FIELDS]
    if fixed:
        return message + (
            f" {', '.join(fixed)} are fixed by each method, so these objectives cannot share a "
            "teacher: train them separately."
        )
    overrides = [
        f"objective.{n}.teacher.{f}={getattr(first, f)}"
        for n in names[1:] for f in fields if getattr(specs[n], f) != getattr(first, f)
    ]
    return message + f" Align them, e.g. (to {names[0]}'s values): {' '.join(overrides)}"


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
        spec = shared_teacher_spec(self.objectives)
        self.teacher = EMATeacher(self.mirrored_by_teacher(), spec) if spec else None
        self.schedules: dict[str, np.ndarray] = {}
        self.sharded = False
        self.guard = NonFiniteGuard(max_consecutive_nonfinite)
        self.device_guard: DeviceCounters | None = None  # when the skip is decided on the device
        self.progress_metrics: dict[str, float] = {}  # host values for the progress bar, per read
        self._loss_finite: torch.Tensor | None = None  # over this optimizer step's micro-batches
        self._skip_step = False  # decided on the host (fp16, optimizers that cannot skip themselves)
        self._skip: torch.Tensor | None = None  # decided on the device
        self._found_inf_on: torch.optim.Optimizer | None = None
        self._weights_from: str | None = None  # the newest checkpoint when this step started
        self._last_loss: torch.Tensor | None = None
        self._steps_since_read = 0
        self._schedule_tensors: dict[str, tuple[np.ndarray, torch.Tensor]] = {}

    def configure_model(self) -> None:
        """`trainer.strategy=fsdp` (a device mesh from Lightning): shard the blocks with FSDP2.

        The student's blocks (backbone, then heads the objectives offer) and their teacher copies.
        """
        if self.device_mesh is None or self.sharded:
            return
        blocks = transformer_blocks(self.backbone)
        blocks += [block for objective in self.objectives.values() for block in objective.sharded_blocks()]
        if self.teacher is not None:
            wanted = {id(block) for block in blocks}
            pairs = zip(self.mirrored_by_teacher().modules(), self.teacher.module.modules())
            blocks += [copy for original, copy in pairs if id(original) in wanted]
        shard_modules(blocks, self.device_mesh, root=self)
        self.sharded = True

    def mirrored_by_teacher(self) -> nn.ModuleDict:
        """The student parts the teacher averages: backbone plus heads objectives ask for."""
        parts: dict[str, nn.Module] = {"backbone": self.backbone}
        for name, objective in self.objectives.items():
            head = objective.teacher_heads() if objective.needs_teacher else None
            if head is not None:
                parts[name] = head
        return nn.ModuleDict(parts)

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
        """Per-step lr, weight decay and teacher momentum.

        `frozen_epochs` (CoKe) keep lr at 0 first; warm-up and decay follow over the rest.

        lr = base lr x global batch / lr_reference_batch (256 for DINO and MAE, 512 for MFM);
        MFM's recipe also scales its min and warm-up start lr (`scale_min_lr_with_batch`).
        """
        cfg = self.optim_cfg
        scale = self.global_batch_size() / cfg.get("lr_reference_batch", 256)
        lr = cfg.lr * (scale if cfg.scale_lr_with_batch else 1.0)
        low_scale = scale if cfg.get("scale_min_lr_with_batch", False) else 1.0
        min_lr, warmup_start = cfg.min_lr * low_scale, cfg.get("warmup_start_lr", 0.0) * low_scale
        warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
        # CoKe's bootstrap epoch(s): lr 0 while labels and centres are initialised.
        frozen = min(int(round(cfg.get("frozen_epochs", 0) * steps_per_epoch)), total_steps)
        lrs = lr_schedule(cfg)(lr, min_lr, total_steps - frozen, warmup, warmup_start)
        schedules = {
            "lr": frozen_then(frozen, lrs),
            "weight_decay": cosine_schedule(cfg.weight_decay, cfg.weight_decay_end, total_steps),
        }
        if self.teacher is not None:
            spec = self.teacher.spec
            schedules["momentum"] = momentum_schedule(
                spec.schedule, spec.momentum, spec.momentum_end, total_steps, spec.ramp_steps
            )
        return schedules

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
        if self.teacher is not None:
            self.teacher.follow_mode_policy(self.backbone.training)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        ctx = self.context()
        teacher = self.teacher.module if self.teacher is not None else None
        total = 0.0
        logs: dict[str, torch.Tensor] = {}
        for name, objective in self.objectives.items():
            out = objective.loss(batch, self.backbone, teacher, ctx)
            total = total + self.weights.get(name, 1.0) * out.loss
            logs[f"{name}/loss"] = out.loss.detach()
            for key, value in out.metrics.items():
                logs[f"{name}/{key}"] = value
        finite = torch.isfinite(total.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self._last_loss = total.detach()
        batch_size = len(batch["index"])
        # No prog_bar=True: Lightning turns those into Python numbers after every batch (a sync);
        # the progress bar shows `progress_metrics` instead (ssl/callbacks/progress.py).
        self.log("train/loss", total.detach(), batch_size=batch_size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=batch_size)
        logged = {"lr": "lr", "weight_decay": "weight_decay", "momentum": "teacher_momentum"}
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
        """Decide whether this step is applied, clip (DINO: per parameter, after AMP unscaling) and
        run the objective hooks (DINO freeze).

        Lightning calls this after backward (and after the fp16 scaler's unscaling), inside
        `optimizer.step`. With an optimizer that skips itself on the device (`skips_on_device`:
        fused AdamW / SGD, LARS) and no fp16 GradScaler, the decision never reaches the host: the
        optimizer gets it as `found_inf`, the teacher as a gated weight, the guard's counters stay
        on the device (`read_guard`), and clipping and the hooks run on every step (clipping
        non-finite gradients is harmless when the update is gated). Otherwise (fp16: the GradScaler
        sets `found_inf` itself and already syncs; other optimizers) the flags are read here, one
        sync per step, and a skipped step has its gradients dropped: the optimizers step no
        parameter without a gradient, so weights, moments and step counts stay as they were.
        """
        self.unscale_gradients(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if self.sharded:  # FSDP2 reduced the blocks' gradients; the replicated rest is averaged here
            average_replicated_gradients(params)
        self._weights_from = self.newest_checkpoint()
        if self.grad_scaler() is None and skips_on_device(optimizer):
            bad = self.nonfinite_flags(params).sum() > 0
            optimizer.found_inf = bad.float()  # what torch's fused optimizers read (0-dim float32)
            self._found_inf_on, self._skip = optimizer, bad
            if self.device_guard is None:
                self.device_guard = DeviceCounters(bad.device)
            self.device_guard.update(bad, self.global_step, self.guard.max_consecutive)
            self.clip_and_run_hooks(params)
            self.log("train/nonfinite_skipped", self.device_guard.skipped.float())
            self.log("train/nonfinite_consecutive", self.device_guard.consecutive.float())
            return
        if self.step_is_finite(params):
            self.guard.good(self._weights_from)
            self.clip_and_run_hooks(params)
        else:
            self._skip_step = True
            for param in params:
                param.grad = None
        self.log("train/nonfinite_skipped", float(self.guard.skipped))
        self.log("train/nonfinite_consecutive", float(self.guard.consecutive))
        if self.guard.overflows:
            self.log("train/amp_overflow_skipped", float(self.guard.overflows))

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

    def unscale_gradients(self, optimizer: torch.optim.Optimizer) -> None:
        """fp16: have the GradScaler unscale the gradients before they are checked or clipped.

        Lightning unscales before this hook, except for optimizers that unscale inside their own
        step (the fused AdamW of ssl.optim.factory): their gradients would be clipped while still
        multiplied by the loss scale. Unscaling here also records the scaler's inf check, so its
        `step` skips an overflow and its `update` lowers the scale as usual.
        """
        scaler = self.grad_scaler()
        if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)

    def nonfinite_flags(self, params: list[nn.Parameter]) -> torch.Tensor:
        """[loss not finite, gradients not finite] of this optimizer step, summed over ranks so that
        all of them decide alike; on the device, no host sync."""
        loss_ok = self._loss_finite
        if loss_ok is None:
            loss_ok = torch.ones((), dtype=torch.bool, device=self.device)
        self._loss_finite = None
        grads_ok = all_finite((p.grad for p in params), device=self.device)
        flags = torch.stack([~loss_ok.to(self.device), ~grads_ok.to(self.device)]).float()
        return all_reduce_sum(flags)

    def step_is_finite(self, params: list[nn.Parameter]) -> bool:
        """Whether this optimizer step's losses and gradients are finite on every rank (host path).

        One host sync per optimizer step. Under an fp16 GradScaler, inf gradients with a finite
        loss are the scaler's overflows (it skips them and lowers its scale): counted apart, never
        a reason to stop. Raises `NonFiniteLossError` after too many consecutive failures.
        """
        bad_loss, bad_grads = (bool(v) for v in self.nonfinite_flags(params).tolist())
        if not (bad_loss or bad_grads):
            return True
        if bad_grads and not bad_loss and self.grad_scaler() is not None:
            self.guard.overflow()
        else:
            self.guard.bad(self.global_step)
        return False

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Set this step's lr / wd, step, then move the teacher (once per optimizer step).

        The teacher stays put when the step was skipped (non-finite, or an fp16 scaler overflow).
        Every `read_interval()` steps the host reads the device state (`read_guard`).
        """
        if self.schedules:
            lr, wd = self.scheduled("lr"), self.scheduled("weight_decay")
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
                if group.get("apply_weight_decay") and not group.get("fixed_weight_decay"):
                    group["weight_decay"] = wd
        self._skip_step, self._skip = False, None
        try:
            optimizer.step(closure=optimizer_closure)
        finally:
            if self._found_inf_on is not None:  # set for this step only
                del self._found_inf_on.found_inf
                self._found_inf_on = None
        if self.teacher is not None and not self._skip_step:
            momentum = self.scheduled("momentum") if self.schedules else self.teacher.spec.momentum
            self.teacher.update(self.mirrored_by_teacher(), momentum, skip=self._skip)
        self._steps_since_read += 1
        if self._steps_since_read >= self.read_interval():
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
        self._steps_since_read = 0
        parts = [self.device_guard.values()] if self.device_guard is not None else []
        if self._last_loss is not None:
            parts.append(self._last_loss.double().reshape(1))
        if not parts:
            return
        values = torch.cat(parts).tolist()
        if self._last_loss is not None:
            self.progress_metrics = {"train/loss": values.pop()}
            if self.schedules:
                self.progress_metrics["train/lr"] = self.scheduled("lr")
        if self.device_guard is not None:
            self.device_guard.apply(values, self.guard, self._weights_from)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the guard before each save (see `read_guard`)."""
        self.read_guard()

    def on_train_end(self) -> None:
        """A limit reached in the last steps before the end still stops the run with its message."""
        self.read_guard()

    def eval_backbone(self, which: str = "teacher") -> Backbone:
        """The backbone evaluations use: the teacher's when there is one (DINO's protocol)."""
        if which == "teacher" and self.teacher is not None:
            return self.teacher["backbone"]
        return self.backbone
