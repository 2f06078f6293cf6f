"""DINO numerics pinned to the known values of reference/methods.md section 2.10."""

import math

import pytest
import torch

from ssl.heads.dino import DINOHead
from ssl.losses.dino import dino_loss, updated_center
from ssl.objectives import recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.dino import DINO
from ssl.optim.clipping import clip_gradients, clip_per_parameter

S1, S2 = [1.0, 0, 0, 0], [0, 1.0, 0, 0]
T1, T2 = [1.0, 0, 0, 0], [0, 0, 1.0, 0]


def test_toy_loss_two_crops_and_center() -> None:
    student, teacher = torch.tensor([S1, S2]), torch.tensor([T1, T2])
    center = torch.zeros(1, 4)
    assert dino_loss(student, teacher, center, 2, 0.1, 0.04).item() == pytest.approx(10.000136, abs=1e-5)
    new_center = updated_center(center, teacher, 0.9)
    assert torch.allclose(new_center, torch.tensor([[0.05, 0, 0.05, 0]]))


def test_toy_loss_four_crops() -> None:
    student = torch.tensor([S1, S2, [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    teacher = torch.tensor([T1, T2])
    loss = dino_loss(student, teacher, torch.zeros(1, 4), 4, 0.1, 0.04)
    assert loss.item() == pytest.approx(8.3334695, abs=1e-5)


@pytest.mark.parametrize("k", [4, 65536])
def test_uniform_logits_give_log_k(k: int) -> None:
    loss = dino_loss(torch.zeros(6, k), torch.zeros(2, k), torch.zeros(1, k), 6)
    assert loss.item() == pytest.approx(math.log(k), rel=1e-6)


def brute_force_loss(student, teacher, center, n_crops, ts=0.1, tt=0.04):
    s_chunks = student.chunk(n_crops)
    t_chunks = teacher.chunk(2)
    terms = []
    for i in range(2):
        q = torch.softmax((t_chunks[i] - center) / tt, dim=-1)
        for v in range(n_crops):
            if v == i:
                continue
            for b in range(q.shape[0]):
                terms.append(-(q[b] * torch.log_softmax(s_chunks[v][b] / ts, dim=-1)).sum())
    per_pair = len(terms) // q.shape[0]
    return torch.stack(terms).sum() / q.shape[0] / per_pair, per_pair


@pytest.mark.parametrize("n_local", [0, 2, 8, 10])
def test_pair_count_and_brute_force(n_local: int) -> None:
    torch.manual_seed(n_local)
    b, k = 3, 7
    n_crops = 2 + n_local
    student, teacher = torch.randn(n_crops * b, k), torch.randn(2 * b, k)
    center = torch.randn(1, k) * 0.1
    expected, pairs = brute_force_loss(student, teacher, center, n_crops)
    assert pairs == 2 * (n_local + 1)
    assert dino_loss(student, teacher, center, n_crops).item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_temperature_warmup() -> None:
    dino = DINO(8, **recipe_settings(
        "dino", out_dim=16, hidden_dim=8, bottleneck_dim=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
        warmup_teacher_temp_epochs=30,
    ))
    assert dino.teacher_temperature(0) == pytest.approx(0.04)
    assert dino.teacher_temperature(1) == pytest.approx(0.0410345, abs=1e-7)
    assert dino.teacher_temperature(29) == pytest.approx(0.07)
    assert dino.teacher_temperature(30) == pytest.approx(0.07)
    assert dino.teacher_temperature(250) == pytest.approx(0.07)


def test_per_parameter_clipping_is_not_global_norm() -> None:
    big = torch.nn.Parameter(torch.zeros(2))
    small = torch.nn.Parameter(torch.zeros(2))
    big.grad = torch.tensor([6.0, 0.0])
    small.grad = torch.tensor([0.0, 2.0])
    clip_per_parameter([big, small], 3.0)
    assert big.grad[0].item() == pytest.approx(6.0 * 3.0 / 6.000001, rel=1e-7)
    assert torch.equal(small.grad, torch.tensor([0.0, 2.0]))
    # Global-norm clipping at 3 would also have shrunk the small gradient.
    g_big, g_small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    g_big.grad, g_small.grad = torch.tensor([6.0, 0.0]), torch.tensor([0.0, 2.0])
    torch.nn.utils.clip_grad_norm_([g_big, g_small], 3.0)
    assert not torch.allclose(g_small.grad, small.grad)


def test_head_with_norm_last_layer_gives_cosines_and_g_stays_one() -> None:
    head = DINOHead(16, out_dim=32, hidden_dim=24, bottleneck_dim=8, norm_last_layer=True)
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    out = head(torch.randn(5, 16))
    assert out.abs().max() <= 1.0 + 1e-6
    out.sum().backward()
    opt.step()
    assert torch.all(head.last_layer.parametrizations.weight.original0 == 1)
    assert head(torch.randn(5, 16)).abs().max() <= 1.0 + 1e-6


def test_freeze_last_layer_in_epoch_zero_leaves_it_bit_identical() -> None:
    dino = DINO(8, **recipe_settings(
        "dino", out_dim=16, hidden_dim=8, bottleneck_dim=4, norm_last_layer=False,
    ))
    params = [p for p in dino.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.1, weight_decay=0.5)
    before = [p.clone() for p in dino.head.last_layer.parameters()]
    mlp_before = [p.clone() for p in dino.head.mlp.parameters()]
    dino.head(torch.randn(4, 8)).pow(2).sum().backward()
    dino.before_optimizer_step(StepContext(epoch=0))
    opt.step()
    for b, p in zip(before, dino.head.last_layer.parameters()):
        assert torch.equal(b, p)  # no update and no weight decay
    assert any(not torch.equal(b, p) for b, p in zip(mlp_before, dino.head.mlp.parameters()))
    # From epoch 1 on the layer trains.
    opt.zero_grad()
    dino.head(torch.randn(4, 8)).pow(2).sum().backward()
    dino.before_optimizer_step(StepContext(epoch=1))
    opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, dino.head.last_layer.parameters()))


def test_center_used_by_loss_is_previous_steps() -> None:
    """The loss of a step uses the centre before that step's update."""
    from omegaconf import OmegaConf

    from ssl.backbones.factory import build_backbone

    backbone = build_backbone(OmegaConf.create(
        {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8, "drop_path_rate": 0.0,
         "kwargs": {"depth": 1}}))
    dino = DINO(backbone.embed_dim, **recipe_settings(
        "dino", out_dim=32, hidden_dim=16, bottleneck_dim=8, local_crops=1,
    ))
    teacher = torch.nn.ModuleDict({"backbone": backbone, "dino": dino.head})
    torch.manual_seed(0)
    views = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8)]
    out = dino.loss({"views": views}, backbone, teacher, StepContext())
    assert torch.count_nonzero(dino.center) > 0
    with torch.no_grad():
        s = dino.head(torch.cat([backbone(torch.cat(views[:2])), backbone(views[2])]))
        t = dino.head(backbone(torch.cat(views[:2])))
    expected = dino_loss(s, t, torch.zeros(1, 32), 3)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(dino.center, updated_center(torch.zeros(1, 32), t))


def test_global_norm_mode_equals_torch_clip_grad_norm() -> None:
    """`optimizer.clip_mode=global_norm` is torch's clip_grad_norm_ (ours also handles FSDP shards)."""
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    theirs = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
    for a, b in zip(ours, theirs):
        a.grad = torch.randn_like(a) * 4
        b.grad = a.grad.clone()
    clip_gradients(ours, 1.5, "global_norm")
    torch.nn.utils.clip_grad_norm_(theirs, 1.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7)
    assert torch.cat([p.grad.flatten() for p in ours]).norm() == pytest.approx(1.5, rel=1e-5)
