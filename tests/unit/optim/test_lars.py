"""LARS as in CoKe's `coke/optimizer.py`: hand-computed steps, a reference loop, the factory."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from ssl.optim.factory import OPTIMIZERS, build_optimizer, default_no_weight_decay, split_weight_decay
from ssl.optim.lars import LARS


def reference_lars_step(groups: list[dict], state: dict) -> None:
    """The official algorithm, one tensor at a time (exclusion by group instead of by ndim)."""
    for g in groups:
        for p in g["params"]:
            if p.grad is None:
                continue
            d = p.grad
            if not g["lars_exclude"]:
                d = d.add(p, alpha=g["weight_decay"])
                pn, dn = torch.norm(p), torch.norm(d)
                q = g["trust_coefficient"] * pn / dn if pn > 0 and dn > 0 else torch.ones_like(pn)
                d = d.mul(q)
            mu = state.setdefault(p, torch.zeros_like(p))
            mu.mul_(g["momentum"]).add_(d)
            with torch.no_grad():
                p.add_(mu, alpha=-g["lr"])


def test_one_step_by_hand() -> None:
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.0], [0.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    w.grad = torch.tensor([[0.97, 0.6], [0.8, -0.04]])
    b.grad = torch.tensor([0.5, 0.25])
    opt = LARS(
        [{"params": [w]}, {"params": [b], "lars_exclude": True, "weight_decay": 0.1}],
        lr=0.5, momentum=0.9, weight_decay=0.01, trust_coefficient=0.001,
    )
    opt.step()
    # d = g + 0.01 w = [[1, 0.6], [0.8, 0]], ||d|| = sqrt(2); ratio = 0.001 * 5 / sqrt(2).
    d = [[1.0, 0.6], [0.8, 0.0]]
    q = 0.005 / math.sqrt(2.0)
    expected_w = [[3.0 - 0.5 * q * 1.0, -0.5 * q * 0.6], [-0.5 * q * 0.8, 4.0]]
    for row, expected in zip(w.detach().tolist(), expected_w):
        assert row == pytest.approx(expected, abs=1e-6)  # float32 resolution near 3
    # The excluded bias: no weight decay (even with one in its group), no ratio: b - lr g.
    assert b.detach().tolist() == pytest.approx([0.75, -2.125], abs=1e-7)
    # The buffers hold the scaled update; the gradients are left as they were.
    assert opt.state[w]["mu"].tolist()[0] == pytest.approx([q * x for x in d[0]], abs=1e-7)
    assert w.grad.tolist()[1] == pytest.approx([0.8, -0.04])

    # Second step, same gradient on the bias: mu = 0.9 * g + g, b -= lr * mu.
    opt.step()
    assert b.detach().tolist() == pytest.approx([0.75 - 0.5 * 1.9 * 0.5, -2.125 - 0.5 * 1.9 * 0.25], abs=1e-7)


def small_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5),
    )


def test_several_steps_match_the_reference_loop() -> None:
    torch.manual_seed(0)
    model = small_model()
    twin = small_model()
    twin.load_state_dict(model.state_dict())
    cfg = OmegaConf.create({"name": "lars", "momentum": 0.9, "trust_coefficient": 0.001})
    opt = build_optimizer(split_weight_decay(model.named_parameters(), default_no_weight_decay), cfg)
    # The official rule (no decay, no ratio for ndim <= 1), with the official defaults.
    params = list(twin.parameters())
    ref_groups = [
        {"params": [p for p in params if p.ndim > 1], "lars_exclude": False},
        {"params": [p for p in params if p.ndim <= 1], "lars_exclude": True},
    ]
    for ref in ref_groups:
        ref.update(momentum=0.9, trust_coefficient=0.001, weight_decay=0.0)
    ref_state: dict = {}
    x = torch.randn(4, 3, 6, 6)
    for step in range(6):
        lr, wd = 0.2 * (step + 1), 1e-3 * (step + 1)  # as the module's per-step schedules write them
        for group, ref in zip(opt.param_groups, ref_groups):
            group["lr"] = ref["lr"] = lr
            if group["apply_weight_decay"]:
                group["weight_decay"] = ref["weight_decay"] = wd
        for m in (model, twin):
            m.zero_grad()
            m(x).pow(2).mean().backward()
        opt.step()
        reference_lars_step(ref_groups, ref_state)
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_excluded_group_is_sgd_with_momentum() -> None:
    torch.manual_seed(1)
    a = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(t.detach().clone()) for t in a]
    lars = LARS([{"params": a, "lars_exclude": True}], lr=0.1, momentum=0.9, weight_decay=0.5)
    sgd = torch.optim.SGD(b, lr=0.1, momentum=0.9)
    for _ in range(5):
        grads = [torch.randn_like(t) for t in a]
        for p, q, g in zip(a, b, grads):
            p.grad, q.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)


def test_zero_norms_give_ratio_one_and_no_nan() -> None:
    zero_param = torch.nn.Parameter(torch.zeros(3, 3))
    zero_param.grad = torch.full((3, 3), 2.0)
    zero_grad = torch.nn.Parameter(torch.ones(2, 2))
    zero_grad.grad = torch.zeros(2, 2)
    both = torch.nn.Parameter(torch.zeros(2, 3))
    both.grad = torch.zeros(2, 3)
    opt = LARS([zero_param, zero_grad, both], lr=0.1, momentum=0.9, weight_decay=0.0)
    opt.step()
    # ||w|| = 0: ratio 1, so the raw gradient is applied (not eta times it).
    torch.testing.assert_close(zero_param.detach(), torch.full((3, 3), -0.2))
    torch.testing.assert_close(zero_grad.detach(), torch.ones(2, 2))
    torch.testing.assert_close(both.detach(), torch.zeros(2, 3))
    for p in (zero_param, zero_grad, both):
        assert torch.isfinite(opt.state[p]["mu"]).all()


def test_closure_and_missing_grads() -> None:
    w = torch.nn.Parameter(torch.ones(2, 2))
    unused = torch.nn.Parameter(torch.ones(2, 2))
    opt = LARS([w, unused], lr=1.0)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = (w * 3).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(12.0)
    # g = 3 everywhere: ||w|| = 2, ||g|| = 6, ratio 0.001 / 3, so each entry moves by 0.001.
    torch.testing.assert_close(w.detach(), torch.full((2, 2), 0.999))
    assert unused not in opt.state and torch.equal(unused.detach(), torch.ones(2, 2))


def test_factory_builds_lars_with_the_group_flags() -> None:
    model = small_model()
    groups = split_weight_decay(model.named_parameters(), default_no_weight_decay)
    cfg = OmegaConf.load("conf/optimizer/coke.yaml")
    opt = build_optimizer(groups, cfg)
    assert isinstance(opt, LARS) and "lars" in OPTIMIZERS
    decayed, plain = opt.param_groups
    assert decayed["apply_weight_decay"] and not decayed["lars_exclude"]
    assert not plain["apply_weight_decay"] and plain["lars_exclude"]
    assert all(p.ndim > 1 for p in decayed["params"]) and all(p.ndim == 1 for p in plain["params"])
    for g in opt.param_groups:
        assert g["lr"] == 0.0 and g["weight_decay"] == 0.0
        assert g["momentum"] == 0.9 and g["trust_coefficient"] == 0.001
    # trust_coefficient falls back to 0.001 when the config has none.
    bare = OmegaConf.create({"name": "lars", "momentum": 0.8})
    opt = build_optimizer(split_weight_decay(model.named_parameters(), default_no_weight_decay), bare)
    assert opt.param_groups[0]["trust_coefficient"] == 0.001 and opt.param_groups[0]["momentum"] == 0.8


def test_unknown_optimizer_lists_lars() -> None:
    with pytest.raises(ValueError, match="valid: adamw, sgd, lars"):
        build_optimizer([], OmegaConf.create({"name": "lamb"}))
