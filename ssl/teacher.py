"""The EMA teachers of teacher-based objectives.

A teacher is a deep copy of the student's backbone (and the heads objectives ask it to mirror)
that never receives gradients, runs without stochastic depth or dropout, and follows
theta_t <- m * theta_t + (1 - m) * theta_s once per optimizer step with one fused foreach lerp.
It is built in the training module's constructor, so it is part of the LightningModule: DDP
broadcasts it from rank 0 with the student (all ranks start equal) and checkpoints carry it.
Under FSDP its blocks are sharded like the student's, and the EMA runs on the local shards.

Objectives whose `TeacherSpec`s are equal share one teacher; a combination whose objectives ask
for different settings (objective=[dino,data2vec]: cosine momentum and train mode against a
constant one in eval mode) gets one teacher per distinct spec (`teacher_groups`), so that neither
method's teacher changes. Each extra teacher costs one more copy of the backbone.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ssl.sharding import local


@dataclass(frozen=True)
class TeacherSpec:
    """How an objective's EMA teacher behaves (objectives with equal specs share one).

    momentum -> momentum_end per optimizer step, following `schedule`: "cosine" over the run
    (DINO), "constant" (data2vec 1.0: momentum only) or "linear" over `ramp_steps` updates then
    constant (data2vec 2.0). `train_mode` says whether the teacher follows the student's
    train/eval mode (DINO) or always stays in eval mode (data2vec). `buffers`: "keep" (EMA over
    parameters only, as DINO) or "copy" (buffers copied each step).
    """

    momentum: float = 0.996
    momentum_end: float = 1.0
    train_mode: bool = True
    buffers: str = "keep"
    schedule: str = "cosine"
    ramp_steps: int = 0


class TeacherUser(Protocol):
    """What the grouping needs of an objective (duck-typed: no import of ssl.objectives)."""

    needs_teacher: bool

    def teacher_spec(self) -> TeacherSpec: ...


# Teacher settings a user can set per objective (objective.<name>.teacher.<field>); train_mode and
# buffers are fixed by each method.
ALIGNABLE_TEACHER_FIELDS = ("momentum", "momentum_end", "schedule", "ramp_steps")


@dataclass(frozen=True)
class TeacherGroup:
    """Objectives sharing one EMA teacher: their common spec and their names, in objective order.

    `key` is the first objective's name: extra teachers are stored and logged under it.
    """

    spec: TeacherSpec
    objectives: tuple[str, ...]

    @property
    def key(self) -> str:
        return self.objectives[0]


def teacher_groups(objectives: Mapping[str, TeacherUser]) -> list[TeacherGroup]:
    """The teacher-based objectives grouped by equal `TeacherSpec`, in order of first appearance.

    `objectives`: name -> anything with `needs_teacher` and `teacher_spec()`. The first group's
    teacher is the one evaluation and export use (the first teacher-based objective's). Empty when
    no objective needs a teacher.
    """
    by_spec: dict[TeacherSpec, list[str]] = {}
    for name, obj in objectives.items():
        if obj.needs_teacher:
            by_spec.setdefault(obj.teacher_spec(), []).append(name)
    return [TeacherGroup(spec, tuple(names)) for spec, names in by_spec.items()]


def separate_teachers_note(groups: list[TeacherGroup]) -> str:
    """Why a combination trains several teachers, what it costs, and how to share one instead.

    Sharing is only possible when the differing fields are all user settings (momentum and its
    schedule); train mode and buffer policy are fixed by each method.
    """
    specs = {group.key: group.spec for group in groups}
    names, extra = list(specs), len(groups) - 1
    first = specs[names[0]]
    fields = [f for f in TeacherSpec.__dataclass_fields__
              if len({getattr(s, f) for s in specs.values()}) > 1]
    differ = "; ".join(
        f"teacher.{f}: " + ", ".join(f"{n}={getattr(s, f)}" for n, s in specs.items()) for f in fields
    )
    message = (
        f"objectives {', '.join(names)} ask for different teacher settings ({differ}): each keeps its "
        f"own EMA teacher ({extra} more backbone cop{'y' if extra == 1 else 'ies'} in memory); evaluation "
        f"and export use {names[0]}'s."
    )
    if any(f not in ALIGNABLE_TEACHER_FIELDS for f in fields):
        return message
    overrides = [
        f"objective.{n}.teacher.{f}={getattr(first, f)}"
        for n in names[1:] for f in fields if getattr(specs[n], f) != getattr(first, f)
    ]
    return message + f" To share one (with {names[0]}'s settings): {' '.join(overrides)}"


def disable_stochastic_layers(module: nn.Module) -> None:
    """Zero drop-path and dropout probabilities (DINO builds its teacher without drop path)."""
    for sub in module.modules():
        if isinstance(sub, nn.Dropout):
            sub.p = 0.0
        if hasattr(sub, "drop_prob") and isinstance(sub.drop_prob, float):
            sub.drop_prob = 0.0


class EMATeacher(nn.Module):
    """EMA copy of `student` (an nn.ModuleDict with "backbone" and objective heads)."""

    def __init__(self, student: nn.ModuleDict, spec: TeacherSpec) -> None:
        super().__init__()
        self.module = copy.deepcopy(student)
        self.module.requires_grad_(False)
        disable_stochastic_layers(self.module)
        self.spec = spec
        self.train(student.training)

    def train(self, mode: bool = True) -> EMATeacher:
        """Follow the student's mode only when the objective wants it (BN batch statistics)."""
        return super().train(mode and self.spec.train_mode)

    def follow_mode_policy(self, student_training: bool) -> None:
        """Re-apply the mode policy before each step.

        Lightning restores the modes it captured by writing each submodule's `training` flag
        directly, which bypasses `train()`; a data2vec teacher must still never run in train mode.
        """
        wanted = student_training and self.spec.train_mode
        if any(m.training != wanted for m in self.modules()):
            super().train(wanted)

    def __getitem__(self, key: str) -> nn.Module:
        return self.module[key]

    @torch.no_grad()
    def update(self, student: nn.ModuleDict, momentum: float, skip: torch.Tensor | None = None) -> None:
        """theta_t <- m theta_t + (1 - m) theta_s over parameters (fused foreach ops).

        `skip`: a 0-dim bool tensor on the device, True when the optimizer step was skipped; the
        teacher then stays put, decided on the device (weight (1 - m)(1 - skip)) without a host sync.
        A single 0-dim tensor weight would be read on the host, so each parameter gets the weight
        as a broadcast view of its shape: still one pass, no temporary copy of the parameters
        (a `t += w (s - t)` form needs one: about 4x slower and 350 MB more for a ViT-B).
        """
        teacher_params = [local(p) for p in self.module.parameters()]
        student_params = [local(p.detach()) for p in student.parameters()]
        if len(teacher_params) != len(student_params):
            raise RuntimeError("teacher and student have different parameter lists")
        if skip is None:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - momentum)
        elif teacher_params:
            weight = (1.0 - momentum) * (~skip).float()
            by_dtype = {dtype: weight.to(dtype) for dtype in {t.dtype for t in teacher_params}}
            weights = [by_dtype[t.dtype].expand_as(t) for t in teacher_params]
            torch._foreach_lerp_(teacher_params, student_params, weights)
        if self.spec.buffers == "copy":
            for t, s in zip(self.module.buffers(), student.buffers()):
                t.copy_(s if skip is None else torch.where(skip, t, s))
