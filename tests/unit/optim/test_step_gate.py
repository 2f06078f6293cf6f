"""StepGate on its own, without Lightning: which steps are applied, on which path, and the counters."""

from __future__ import annotations

import math

import pytest
import torch

from ssl.optim.nonfinite import NonFiniteLossError
from ssl.optim.step_gate import StepGate
from ssl.sync_detector import SyncDetector

CPU = torch.device("cpu")


def setup(fused: bool) -> tuple[torch.nn.Parameter, torch.optim.Optimizer]:
    param = torch.nn.Parameter(torch.ones(3))
    return param, torch.optim.AdamW([param], lr=0.1, weight_decay=0.0, fused=fused, foreach=not fused)


def one_step(gate: StepGate, param: torch.nn.Parameter, optim: torch.optim.Optimizer, step: int,
             loss_value: float = 1.0, grad_value: float = 1.0, checkpoint: str | None = None,
             scaler: object = None) -> bool | None:
    """What SSLModule does around one optimizer step; returns `decide`'s answer."""
    answer: list[bool] = []

    def closure() -> None:
        gate.observe_loss(torch.tensor(loss_value))
        param.grad = torch.full_like(param, grad_value)
        answer.append(gate.decide(optim, [param], step, CPU, scaler, checkpoint))

    gate.step(optim, closure)
    optim.zero_grad(set_to_none=True)
    return answer[0] if answer else None


def read(gate: StepGate) -> None:
    state = gate.state()
    gate.read(state.tolist() if state is not None else [])


def test_device_path_gates_the_step_without_a_sync_and_counts_on_the_device() -> None:
    param, optim = setup(fused=True)
    gate = StepGate(max_consecutive=5)
    assert one_step(gate, param, optim, 0) is True
    moved = param.detach().clone()
    assert not torch.equal(moved, torch.ones(3))
    with SyncDetector() as detector:
        assert one_step(gate, param, optim, 1, loss_value=math.nan) is True  # clip / hooks still run
    assert detector.syncs == [], detector.report()
    assert torch.equal(param.detach(), moved)  # skipped by the optimizer itself (found_inf)
    assert not hasattr(optim, "found_inf")  # for one step only
    assert gate.counters is not None and bool(gate.device_skip) and not gate.host_skipped
    assert (int(gate.counters.skipped), int(gate.counters.consecutive)) == (1, 1)
    assert gate.guard.skipped == 0  # the host knows only after a read
    metrics = gate.metrics()
    assert isinstance(metrics["train/nonfinite_skipped"], torch.Tensor)
    assert float(metrics["train/nonfinite_skipped"]) == 1.0
    read(gate)
    assert (gate.guard.skipped, gate.guard.consecutive) == (1, 1)


def test_host_path_drops_the_gradients_of_a_skipped_step_and_counts_at_once() -> None:
    param, optim = setup(fused=False)
    gate = StepGate(max_consecutive=5)
    assert one_step(gate, param, optim, 0, grad_value=math.inf, checkpoint="a.ckpt") is False
    assert gate.host_skipped and gate.device_skip is None and gate.counters is None
    assert torch.equal(param.detach(), torch.ones(3)) and not optim.state
    assert (gate.guard.skipped, gate.guard.consecutive) == (1, 1)
    assert gate.guard.last_good_checkpoint is None
    assert gate.metrics() == {"train/nonfinite_skipped": 1.0, "train/nonfinite_consecutive": 1.0}
    assert one_step(gate, param, optim, 1, checkpoint="b.ckpt") is True
    assert not gate.host_skipped and not torch.equal(param.detach(), torch.ones(3))
    assert (gate.guard.skipped, gate.guard.consecutive) == (1, 0)
    assert gate.guard.last_good_checkpoint == "b.ckpt"


def test_a_nonfinite_loss_of_any_micro_batch_skips_the_step_and_is_forgotten_after_it() -> None:
    param, optim = setup(fused=False)
    gate = StepGate()
    gate.observe_loss(torch.tensor(math.nan))  # an earlier micro-batch of the same step
    assert one_step(gate, param, optim, 0) is False
    assert one_step(gate, param, optim, 1) is True


def test_fp16_overflows_are_counted_apart_and_never_stop_the_run() -> None:
    param, optim = setup(fused=True)  # a scaler forces the host path even for a fused optimizer
    gate = StepGate(max_consecutive=2)
    for step in range(3):
        assert one_step(gate, param, optim, step, grad_value=math.inf, scaler=object()) is False
    assert (gate.guard.overflows, gate.guard.skipped) == (3, 0) and gate.counters is None
    assert gate.metrics()["train/amp_overflow_skipped"] == 3.0


def test_host_path_raises_at_the_limit() -> None:
    param, optim = setup(fused=False)
    gate = StepGate(max_consecutive=2)
    one_step(gate, param, optim, 0, loss_value=math.nan)
    with pytest.raises(NonFiniteLossError, match=r"2 consecutive .*\(the last at step 1; 2 skipped"):
        one_step(gate, param, optim, 1, loss_value=math.nan)


def test_device_path_raises_at_the_read_after_the_limit_naming_the_step_that_reached_it() -> None:
    param, optim = setup(fused=True)
    gate = StepGate(max_consecutive=2)
    one_step(gate, param, optim, 0, checkpoint="good.ckpt")
    read(gate)
    assert gate.guard.last_good_checkpoint == "good.ckpt"
    for step in (1, 2, 3):
        one_step(gate, param, optim, step, loss_value=math.nan, checkpoint="later.ckpt")
    with pytest.raises(NonFiniteLossError, match=r"(?s)the last at step 2; 2 skipped.*good\.ckpt"):
        read(gate)
    assert gate.guard.skipped == 3 and gate.guard.longest == 3


def test_count_step_asks_for_a_read_every_interval_steps() -> None:
    gate = StepGate()
    due = []
    for _ in range(7):
        due.append(gate.count_step(3))
        if due[-1]:
            gate.read()
    assert due == [False, False, True, False, False, True, False]
