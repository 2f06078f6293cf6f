"""Per-optimizer-step schedules, precomputed once (lr, weight decay, EMA momentum).

`training_schedules` turns an optimizer recipe (conf/optimizer/*.yaml) and the run's size into the
arrays the training module indexes by `global_step`; the curves themselves are pure functions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ssl.teacher import TeacherSpec


def cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """DINO's `cosine_scheduler`, per step: linear warm-up then half-cosine from base to final.

    The warm-up is `linspace(warmup_start, base, warmup_steps)` (endpoint included, as in the
    official code); step i of the cosine part is final + (base - final)(1 + cos(pi i / n)) / 2.
    """
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    warmup = np.linspace(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    steps = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * steps / max(n, 1)))
    return np.concatenate([warmup, cosine])


def timm_cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """timm's `CosineLRScheduler` (no warmup_prefix), per step, as MFM / SimMIM / Swin use it.

    Warm-up: start + t (base - start) / W for t < W. After it the cosine position is counted
    from step 0 over all steps, final + (base - final)(1 + cos(pi t / T)) / 2, so the peak sits
    just below `base` and the decay is spread over the whole run.
    """
    total_steps = max(int(total_steps), 0)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    t = np.arange(total_steps, dtype=np.float64)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(total_steps, 1)))
    if warmup_steps:
        ramp = warmup_start + t[:warmup_steps] * (base - warmup_start) / warmup_steps
        cosine[:warmup_steps] = ramp
    return cosine


def linear_ramp_schedule(start: float, end: float, total_steps: int, ramp_steps: int) -> np.ndarray:
    """fairseq's `get_annealed_rate`: end - (end - start)(1 - t / T) for t < T, then `end`."""
    t = np.arange(max(int(total_steps), 0), dtype=np.float64)
    if ramp_steps <= 0:
        return np.full_like(t, end)
    return np.where(t < ramp_steps, end - (end - start) * (1 - t / ramp_steps), end)


def momentum_schedule(
    kind: str, start: float, end: float, total_steps: int, ramp_steps: int = 0
) -> np.ndarray:
    """The EMA teacher's momentum per optimizer step: cosine | constant | linear."""
    if kind == "cosine":
        return cosine_schedule(start, end, total_steps)
    if kind == "constant":
        return np.full(max(int(total_steps), 0), start, dtype=np.float64)
    if kind == "linear":
        return linear_ramp_schedule(start, end, total_steps, ramp_steps)
    raise ValueError(f"unknown teacher momentum schedule '{kind}'; valid: cosine, constant, linear")


def ramp_cosine_schedule(
    base: float,
    final: float,
    total_steps: int,
    warmup_steps: int = 0,
    warmup_start: float = 0.0,
) -> np.ndarray:
    """CoKe's `adjust_learning_rate` after its bootstrap epoch: linear ramp, then half-cosine.

    Ramp: base * max(1, t) / W for t < W, so steps 0 and 1 share the smallest lr and the ramp
    never reaches 0 or base (its last value is base (W - 1) / W); `warmup_start` is accepted for
    the common signature and ignored. Then final + (base - final)(1 + cos(pi (t - W) / (T - W))) / 2,
    which starts at exactly `base` on step W.
    """
    total_steps = max(int(total_steps), 0)
    warmup_steps = min(max(int(warmup_steps), 0), total_steps)
    t = np.arange(total_steps, dtype=np.float64)
    span = max(total_steps - warmup_steps, 1)
    lr = final + 0.5 * (base - final) * (1 + np.cos(np.pi * (t - warmup_steps) / span))
    if warmup_steps:
        lr[:warmup_steps] = base * np.maximum(1.0, t[:warmup_steps]) / warmup_steps
    return lr


def frozen_then(frozen_steps: int, rest: np.ndarray) -> np.ndarray:
    """`frozen_steps` zeros, then `rest`: CoKe's first epoch (lr 0) only bootstraps labels and centres."""
    rest = np.asarray(rest, dtype=np.float64)
    return np.concatenate([np.zeros(max(int(frozen_steps), 0)), rest])


LR_SCHEDULES = {
    "cosine": cosine_schedule,
    "timm_cosine": timm_cosine_schedule,
    "ramp_cosine": ramp_cosine_schedule,
}


def lr_schedule(cfg: Any) -> Any:
    """`optimizer.lr_schedule`: cosine (DINO, MAE), timm_cosine (MFM) or ramp_cosine (CoKe);
    unknown names list the valid ones."""
    name = cfg.get("lr_schedule", "cosine")
    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown optimizer.lr_schedule '{name}'; valid: {', '.join(LR_SCHEDULES)}")
    return LR_SCHEDULES[name]


def training_schedules(
    cfg: Any,
    global_batch: int,
    total_steps: int,
    steps_per_epoch: int,
    teacher: TeacherSpec | None = None,
    extra_teachers: Mapping[str, TeacherSpec] | None = None,
) -> dict[str, np.ndarray]:
    """Per-step lr, weight decay and (with a `teacher`) EMA momentum for one run.

    "momentum" follows `teacher`; each of `extra_teachers` (a combination's teachers with other
    settings, by key) gets its own curve as "momentum/<key>".

    lr = base lr x `global_batch` / lr_reference_batch (256 for DINO and MAE, 512 for MFM) when
    `scale_lr_with_batch`; MFM's recipe also scales its min and warm-up start lr
    (`scale_min_lr_with_batch`). `frozen_epochs` (CoKe) keep lr at 0 first; warm-up and decay
    follow over the rest. Pure: the same recipe and run size give the same arrays.
    """
    scale = global_batch / cfg.get("lr_reference_batch", 256)
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
    named = {"momentum": teacher} if teacher is not None else {}
    named.update({f"momentum/{key}": spec for key, spec in (extra_teachers or {}).items()})
    for name, spec in named.items():
        schedules[name] = momentum_schedule(
            spec.schedule, spec.momentum, spec.momentum_end, total_steps, spec.ramp_steps
        )
    return schedules


def warmup_constant_schedule(start: float, end: float, warmup: int, total: int) -> np.ndarray:
    """`linspace(start, end, warmup)` then constant `end` (DINO's teacher temperature, per epoch)."""
    warmup = min(max(int(warmup), 0), total)
    return np.concatenate([np.linspace(start, end, warmup), np.full(total - warmup, end)])
