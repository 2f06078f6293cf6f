"""Per-step schedules: DINO's cosine_scheduler known values."""

import numpy as np
import pytest

from ssl.optim.schedules import cosine_schedule, timm_cosine_schedule, warmup_constant_schedule


def test_momentum_schedule_known_values() -> None:
    s = cosine_schedule(0.996, 1.0, 100 * 10)
    assert s[0] == pytest.approx(0.996)
    assert s[500] == pytest.approx(0.998)
    assert s[-1] == pytest.approx(0.99999999013, abs=1e-11)
    assert len(s) == 1000 and np.all(np.diff(s) >= 0)


def test_lr_schedule_with_warmup() -> None:
    base = 5e-4
    s = cosine_schedule(base, 1e-6, 100 * 10, warmup_steps=10 * 10)
    assert s[0] == 0.0
    assert s[99] == pytest.approx(base)
    assert s[100] == pytest.approx(base)
    assert s[-1] == pytest.approx(1e-6, abs=1e-8)
    assert np.all(np.diff(s[:100]) > 0) and np.all(np.diff(s[100:]) <= 0)


def test_teacher_temperature_schedule() -> None:
    s = warmup_constant_schedule(0.04, 0.07, 30, 100)
    assert s[0] == pytest.approx(0.04)
    assert s[1] == pytest.approx(0.0410345, abs=1e-7)
    assert s[29] == pytest.approx(0.07) and s[30] == pytest.approx(0.07)
    assert len(s) == 100


def test_timm_cosine_matches_the_scheduler_formula() -> None:
    """MFM's timm CosineLRScheduler(t_initial=T, warmup_t=W, warmup_lr_init=s), written out."""
    base, final, start, total, warmup = 1.2e-3, 1e-5, 1e-6, 3000, 200
    s = timm_cosine_schedule(base, final, total, warmup, start)
    assert len(s) == total
    assert s[0] == pytest.approx(start)
    assert s[100] == pytest.approx(start + 100 * (base - start) / warmup)
    for t in (200, 1000, 2999):
        assert s[t] == pytest.approx(final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / total)))
    assert s[warmup] < base  # the cosine is already under way when the warm-up ends
    assert s.max() < base


def test_lr_schedule_is_chosen_by_config() -> None:
    from omegaconf import OmegaConf

    from ssl.optim.schedules import lr_schedule

    assert lr_schedule(OmegaConf.load("conf/optimizer/mfm.yaml")) is timm_cosine_schedule
    assert lr_schedule(OmegaConf.load("conf/optimizer/mae.yaml")) is cosine_schedule
    with pytest.raises(ValueError, match="valid: cosine, timm_cosine"):
        lr_schedule(OmegaConf.create({"lr_schedule": "step"}))
