"""CoKe's losses against brute-force sums (methods.md 6.12).

The references here (per-sample loops, the brute-force loss sums) are written independently of
ssl/losses/coke.py and follow the rules of idstcv/CoKe's builder_*_view.py and main_*_view.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl.losses.coke import cluster_logits, multi_crop_loss, single_view_loss, small_crop_loss, two_view_loss

# ---------------------------------------------------------------------------------------------
# Independent references


def random_unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


# ---------------------------------------------------------------------------------------------
# Losses


def test_two_view_loss_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    n, ks, alpha = 4, (5, 6, 7), 0.2
    logits = {
        name: [torch.randn(n, k, generator=g) for k in ks] for name in ("pred1", "pred2", "proj1", "proj2")
    }
    labels = [torch.randint(0, k, (n,), generator=g) for k in ks]

    def log_p(z: torch.Tensor, i: int, c: int) -> float:
        row = z[i].double()
        return float(row[c] - torch.log(torch.exp(row).sum()))

    def p(z: torch.Tensor, i: int, c: int) -> float:
        return math.exp(log_p(z, i, c))

    total = 0.0
    for j, k in enumerate(ks):
        pairs = [("pred1", "proj2"), ("pred2", "proj1"), ("proj1", "proj2"), ("proj2", "proj1")]
        for student, teacher in pairs:
            z, t = logits[student][j], logits[teacher][j]
            hard = -sum(log_p(z, i, int(labels[j][i])) for i in range(n)) / n
            soft = -sum(p(t, i, c) * log_p(z, i, c) for i in range(n) for c in range(k)) / n
            total += alpha * hard + (1 - alpha) * soft
    expected = total * 0.5 / 6
    got = two_view_loss(logits["pred1"], logits["pred2"], logits["proj1"], logits["proj2"], labels, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_multi_crop_loss_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    n, ks, snum, alpha, beta = 3, (4, 5), 3, 0.2, 0.5
    large = {
        name: [torch.randn(n, k, generator=g) for k in ks] for name in ("pred1", "pred2", "proj1", "proj2")
    }
    pred_s = [[torch.randn(n, k, generator=g) for _ in range(snum)] for k in ks]
    proj_s = [[torch.randn(n, k, generator=g) for _ in range(snum)] for k in ks]
    labels = [torch.randint(0, k, (n,), generator=g) for k in ks]
    small = 0.0
    for j in range(len(ks)):
        target = (large["proj1"][j].double().softmax(1) + large["proj2"][j].double().softmax(1)).tolist()
        for s in range(snum):
            for z in (pred_s[j][s], proj_s[j][s]):
                lp = z.double().log_softmax(1).tolist()
                hard = -sum(lp[i][int(labels[j][i])] for i in range(n)) / n
                soft = -sum(target[i][c] * lp[i][c] for i in range(n) for c in range(ks[j])) / n
                small += 2 * alpha * hard + (1 - alpha) * soft
    small *= 0.5 / (2 * snum * len(ks))
    args = (large["pred1"], large["pred2"], large["proj1"], large["proj2"])
    assert small_crop_loss(pred_s, proj_s, args[2], args[3], labels, alpha).item() == pytest.approx(
        small, rel=1e-5
    )
    expected = beta * two_view_loss(*args, labels, alpha).item() + (1 - beta) * small
    got = multi_crop_loss(*args, pred_s, proj_s, labels, alpha, beta)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_single_view_loss_composition_and_soft_targets() -> None:
    g = torch.Generator().manual_seed(2)
    ks = (5, 7)
    pred = [torch.randn(4, k, generator=g) for k in ks]
    proj = [torch.randn(4, k, generator=g) for k in ks]
    hard = [torch.randint(0, k, (4,), generator=g) for k in ks]
    expected = sum(
        0.3 * F.cross_entropy(a, y) + 0.7 * F.cross_entropy(b, y) for a, b, y in zip(pred, proj, hard)
    )
    assert torch.allclose(single_view_loss(pred, proj, hard, beta=0.3), expected / 2)
    one_hot = [F.one_hot(y, k).float() for y, k in zip(hard, ks)]
    assert torch.allclose(single_view_loss(pred, proj, one_hot, beta=0.3), expected / 2)


def test_gradients_reach_features_not_centres() -> None:
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(6, 8, generator=g, requires_grad=True)
    centers = F.normalize(torch.randn(5, 8, generator=g), dim=1).requires_grad_()
    logits = cluster_logits(feats, centers, 0.1)
    assert logits.abs().max() <= 1 / 0.1 + 1e-4
    labels = torch.randint(0, 5, (6,), generator=g)
    single_view_loss([logits], [logits], [labels]).backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    assert centers.grad is None
    # The cross-view targets are detached: the gradient is that of the sum with constant targets.
    views = [torch.randn(4, 5, generator=g, requires_grad=True) for _ in range(4)]
    pred1, pred2, proj1, proj2 = views
    y = labels[:4]
    two_view_loss([pred1], [pred2], [proj1], [proj2], [y], alpha=0.2).backward()
    auto = [v.grad.clone() for v in views]
    for v in views:
        v.grad = None
    t1, t2 = proj1.detach().softmax(1), proj2.detach().softmax(1)
    manual = 0.0
    for z, t in ((pred1, t2), (pred2, t1), (proj1, t2), (proj2, t1)):
        manual = manual + 0.2 * F.cross_entropy(z, y) - 0.8 * (t * z.log_softmax(1)).sum(1).mean()
    (manual * 0.5 / 2).backward()
    for a, v in zip(auto, views):
        assert torch.allclose(a, v.grad, atol=1e-6)


