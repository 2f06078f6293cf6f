"""CoKe's per-iteration lr (`adjust_learning_rate` in main_*_view.py) from frozen_then + ramp_cosine."""

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

from ssl.optim.schedules import LR_SCHEDULES, frozen_then, lr_schedule, ramp_cosine_schedule

N, EPOCHS, LR = 7, 30, 1.6


def coke_lr() -> np.ndarray:
    return frozen_then(N, ramp_cosine_schedule(LR, 0.0, EPOCHS * N - N, 10 * N))


def official(epoch: int, iteration: int) -> float:
    """The official function, written out for one iteration (11 = bootstrap + 10 ramp epochs)."""
    it, warm, last = epoch * N + iteration, 11 * N, EPOCHS * N
    if epoch == 0:
        return 0.0
    if epoch < 11:
        return LR * max(1, it - N) / (warm - N)
    return LR * (1 + math.cos(math.pi * (it - warm) / (last - warm))) / 2


def test_known_values() -> None:
    s = coke_lr()
    assert len(s) == EPOCHS * N
    assert np.all(s[:N] == 0.0)  # bootstrap epoch
    assert s[N] == pytest.approx(LR / (10 * N))  # epoch 1, iteration 0
    assert s[N + 1] == pytest.approx(LR / (10 * N))  # max(1, t): the first two steps share it
    assert s[11 * N - 1] == pytest.approx(LR * (10 * N - 1) / (10 * N))  # end of the ramp
    assert s[11 * N] == LR  # the cosine starts at exactly lr


def test_matches_the_official_function_everywhere() -> None:
    expected = [official(e, i) for e in range(EPOCHS) for i in range(N)]
    np.testing.assert_allclose(coke_lr(), expected, rtol=1e-12, atol=1e-15)


def test_ramp_rises_and_cosine_decays_to_near_zero() -> None:
    s = coke_lr()
    assert np.all(np.diff(s[N + 1 : 11 * N]) > 0)
    cosine = s[11 * N :]
    assert np.all(np.diff(cosine) < 0)
    assert 0 < cosine[-1] < 1e-3 * LR


def test_ramp_cosine_with_a_floor_and_edge_cases() -> None:
    s = ramp_cosine_schedule(1.0, 0.1, 100, 10, warmup_start=0.5)  # warmup_start is ignored
    assert s[0] == pytest.approx(0.1) and s[9] == pytest.approx(0.9) and s[10] == 1.0
    assert s[-1] == pytest.approx(0.1, abs=1e-3) and s[-1] > 0.1
    assert np.all(ramp_cosine_schedule(1.0, 0.0, 5, 0)[:1] == 1.0)
    assert len(ramp_cosine_schedule(1.0, 0.0, 5, 10)) == 5
    assert len(frozen_then(0, np.ones(3))) == 3


def test_registered_and_selected_by_the_coke_config() -> None:
    assert LR_SCHEDULES["ramp_cosine"] is ramp_cosine_schedule
    cfg = OmegaConf.load("conf/optimizer/coke.yaml")
    assert lr_schedule(cfg) is ramp_cosine_schedule
    assert cfg.frozen_epochs == 1 and cfg.warmup_epochs == 10 and cfg.name == "lars"
