"""CoKe's clustering algorithm: the known values of methods.md 6.12 and loop / distributed equivalences.

The references here (per-sample loops, the brute-force loss sums) are written independently of
ssl/objectives/coke_clustering.py and follow the rules of idstcv/CoKe's builder_*_view.py and main_*_view.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ssl.objectives.coke_clustering import (
    ConstrainedKMeans,
    assign_clusters,
    average_centers,
    center_update,
    compact_label_dtype,
    dual_update,
    soft_targets,
    store_labels,
    update_label_memory,
)

# ---------------------------------------------------------------------------------------------
# Independent references


def loop_dual_update(duals: list[float], labels: list[int], lr: float, ratio: float) -> list[float]:
    k = len(duals)
    out = list(duals)
    for c in set(labels):
        out[c] -= lr * labels.count(c) / len(labels)
    out = [v + lr * ratio / k for v in out]
    return [max(0.0, v) for v in out] if ratio < 1 else out


def loop_center_update(
    centers: torch.Tensor, counters: list[float], feats: torch.Tensor, labels: list[int], renorm: bool
) -> tuple[torch.Tensor, list[float]]:
    centers = centers.clone().double()
    counters = list(counters)
    for k in sorted(set(labels)):
        members = [i for i, y in enumerate(labels) if y == k]
        old = counters[k]
        counters[k] = old + len(members)
        total = torch.zeros(centers.shape[1], dtype=torch.float64)
        for i in members:
            total += feats[i].double()
        centers[k] = centers[k] * old / counters[k] + total / counters[k]
        if renorm:
            centers[k] = centers[k] / centers[k].norm()
    return centers.float(), counters


def loop_label_memory(
    labels: list[list[int]], weights: torch.Tensor, rows: list[int], new: list[int], epoch: int, stage: int
) -> None:
    """One instance at a time (weights [N, S] float32, same float32 steps so eviction ties break alike).

    Every row starts from the memory before the batch; a later duplicate's result replaces an earlier one's.
    """
    results = {}
    for r, y in zip(rows, new):
        lab, w = list(labels[r]), weights[r].clone()
        if epoch == stage:
            lab[0] = y
            w.zero_()
            w[0] = 1.0
        else:
            f = 1.0 / (epoch - stage + 1)
            held = [s for s in range(len(lab)) if w[s] > 0 and lab[s] == y]
            if held:
                slot, removed = held[0], torch.tensor(0.0)
            else:
                values = w.tolist()
                slot = min(range(len(values)), key=lambda s, v=values: (v[s], s))
                removed = w[slot].clone()
                w[slot] = 0.0
            w = w * ((1.0 - f) / (1.0 - removed))
            lab[slot] = y
            w[slot] += torch.tensor(f)
        results[r] = (lab, w)
    for r, (lab, w) in results.items():
        labels[r] = lab
        weights[r] = w


def previous_labels(memory: torch.Tensor, ids: torch.Tensor, fresh: torch.Tensor, epoch: int) -> torch.Tensor:
    """The label lag both sides of the distributed check read (epoch 0: the fresh assignment)."""
    return fresh.long() if epoch == 0 else memory[ids.long()].long()


def random_unit(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=generator), dim=1)


# ---------------------------------------------------------------------------------------------
# Known values (methods.md 6.12)


def test_dual_update_toy_case() -> None:
    duals = torch.zeros(4)
    labels = torch.tensor([0, 0, 0, 1])
    # Before the clamp: -20 * 3/4 + 2 = -13, -20 * 1/4 + 2 = -3, then 2, 2.
    assert torch.allclose(
        dual_update(duals, labels, 4, lr=20.0, ratio=0.4), torch.tensor([0.0, 0.0, 2.0, 2.0])
    )
    assert torch.equal(duals, torch.zeros(4)), "dual_update is pure"
    # No clamp for ratio >= 1 (an equality constraint has free duals): the pre-clamp values show through.
    unclamped = dual_update(duals, labels, 4, lr=20.0, ratio=1.0)
    assert torch.allclose(unclamped, torch.tensor([-10.0, 0.0, 5.0, 5.0]))


def test_center_update_stage1_known_values() -> None:
    centers = F.normalize(torch.tensor([[0.3, -0.7], [-0.2, 0.5]]), dim=1)  # discarded: counters are 0
    counters = torch.zeros(2)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centers, counters = center_update(centers, counters, feats, torch.tensor([0, 1, 1]))
    assert torch.allclose(centers, torch.tensor([[1.0, 0.0], [0.316228, 0.948683]]), atol=1e-6)
    assert torch.equal(counters, torch.tensor([1.0, 2.0]))
    centers, counters = center_update(centers, counters, torch.tensor([[0.8, 0.6]]), torch.tensor([0]))
    assert torch.allclose(centers, torch.tensor([[0.948683, 0.316228], [0.316228, 0.948683]]), atol=1e-6)
    assert torch.equal(counters, torch.tensor([2.0, 2.0]))


def test_center_update_without_renormalisation_is_the_exact_mean() -> None:
    centers, counters = torch.randn(2, 2), torch.zeros(2, dtype=torch.long)
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    centers, counters = center_update(centers, counters, feats, torch.tensor([0, 1, 1]), renormalize=False)
    centers, counters = center_update(centers, counters, torch.tensor([[0.8, 0.6]]), torch.tensor([0]), False)
    assert torch.allclose(centers, torch.tensor([[0.9, 0.3], [0.3, 0.9]]))
    assert counters.dtype == torch.long and counters.tolist() == [2, 2]


def test_absent_clusters_keep_their_centre() -> None:
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    new, counters = center_update(centers, torch.zeros(3), torch.tensor([[0.0, 1.0]]), torch.tensor([0]))
    assert torch.equal(new[1:], centers[1:])
    assert torch.equal(new[0], torch.tensor([0.0, 1.0]))
    assert counters.tolist() == [1.0, 0.0, 0.0]


def test_duals_flip_the_argmax() -> None:
    feats = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    centers = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert assign_clusters(feats, centers, torch.zeros(2)).tolist() == [0, 1]
    # x0: 1.0 vs 0.0 + 1.2; x1: 0.6 vs 0.8 + 1.2.
    assert assign_clusters(feats, centers, torch.tensor([0.0, 1.2])).tolist() == [1, 1]
    assert assign_clusters(feats, centers, torch.tensor([0.3, 0.0])).tolist() == [0, 0]


def test_label_lag_one_epoch() -> None:
    head = ConstrainedKMeans(num_clusters=8, dim=2, num_samples=6)
    memory = head.labels[:, 0]  # the hard label memory, a view
    idx = torch.tensor([4, 1])
    # Epoch 0: the loss sees the fresh assignment; the memory then holds it.
    assert head.targets(idx, torch.tensor([7, 2]), epoch=0).tolist() == [7, 2]
    store_labels(memory, idx, torch.tensor([7, 2]))
    # Epoch 1: instance 4 now goes to 3, but the loss uses epoch 0's 7; afterwards the memory holds 3.
    used = head.targets(idx, torch.tensor([3, 2]), epoch=1)
    assert used.tolist() == [7, 2] and used.dtype == torch.long
    store_labels(memory, idx, torch.tensor([3, 2]))
    assert memory[4].item() == 3 and memory[1].item() == 2


@pytest.mark.parametrize("b", [5, 1])
def test_stage2_soft_labels_known_values(b: int) -> None:
    stage, a, num_clusters = 10, 3, 7
    labels = torch.ones(2, 5, dtype=torch.int16)  # the official memory starts at ones: label 1 must not match
    weights = torch.zeros(2, 5)
    rows = torch.tensor([0])
    for epoch, y in ((stage, a), (stage + 1, a), (stage + 2, b)):
        update_label_memory(labels, weights, rows, torch.tensor([y]), epoch, stage)
    held = {int(lab): float(w) for lab, w in zip(labels[0], weights[0]) if w > 0}
    assert held.keys() == {a, b}
    assert held[a] == pytest.approx(2 / 3) and held[b] == pytest.approx(1 / 3)
    target = soft_targets(labels[rows], weights[rows], num_clusters, t=0.5)[0]
    expected = torch.zeros(num_clusters)
    expected[a], expected[b] = math.exp(2 / 3 / 0.5), math.exp(1 / 3 / 0.5)
    assert torch.allclose(target, expected / expected.sum())
    assert (target == 0).sum() == num_clusters - 2


def test_stage2_eviction_renormalises() -> None:
    stage = 0
    labels, weights = torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2)
    rows = torch.tensor([0])
    for epoch, y in ((0, 4), (1, 6), (2, 9)):
        update_label_memory(labels, weights, rows, torch.tensor([y]), epoch, stage)
    # After epoch 1: {4: 1/2, 6: 1/2}. Epoch 2 evicts the first smallest slot (label 4, weight 1/2): 6 is
    # renormalised to 1, decays to 2/3, and 9 gets 1/3.
    assert labels[0].tolist() == [9, 6]
    assert torch.allclose(weights[0], torch.tensor([1 / 3, 2 / 3]))


def test_stage2_memory_before_stage_writes_the_hard_label_only() -> None:
    labels, weights = torch.ones(3, 5, dtype=torch.int16), torch.zeros(3, 5)
    update_label_memory(labels, weights, torch.tensor([2]), torch.tensor([8]), epoch=4, stage=10)
    assert labels[2].tolist() == [8, 1, 1, 1, 1] and not weights.any()
    # labels[:, 0] is the hard memory the targets read up to and including the stage epoch.
    head = ConstrainedKMeans(num_clusters=10, dim=2, num_samples=3, stage=10)
    head.labels.copy_(labels), head.label_weights.copy_(weights)
    assert head.targets(torch.tensor([2]), torch.tensor([0]), epoch=5).tolist() == [8]


def test_soft_target_of_a_single_label_is_one_hot() -> None:
    target = soft_targets(torch.tensor([[2, 0, 0]]), torch.tensor([[1.0, 0.0, 0.0]]), 4)
    assert torch.equal(target, torch.tensor([[0.0, 0.0, 1.0, 0.0]]))


def test_average_centers() -> None:
    pre = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    cur = torch.tensor([[0.0, 2.0], [0.0, 0.5]])
    new_pre, new_cur = average_centers(pre, cur, epoch=3, stage=10)
    assert torch.equal(new_pre, cur) and torch.equal(new_cur, cur)
    assert torch.equal(average_centers(pre, cur, epoch=3)[0], cur)
    # At the stage epoch f = 1: the classifier becomes normalize(cur).
    new_pre, new_cur = average_centers(pre, cur, epoch=10, stage=10)
    assert torch.allclose(new_pre, torch.tensor([[0.0, 1.0], [0.0, 1.0]])) and torch.equal(new_pre, new_cur)
    # One epoch later f = 1/2: row 0 is normalize(0.5 [1, 0] + 0.5 [0, 1]).
    new_pre, _ = average_centers(pre, cur, epoch=11, stage=10)
    assert torch.allclose(new_pre[0], torch.tensor([1.0, 1.0]) / math.sqrt(2))
    assert torch.allclose(new_pre[1], torch.tensor([0.0, 1.0]))


def test_label_memory_size_and_dtype() -> None:
    n = 1_281_167
    # ImageNet, one head: int16 hard labels are 2.6 MB (int64 would be 10.2 MB); stage 2's five
    # (label, weight) slots add float32 weights.
    hard = ConstrainedKMeans(5000, 4, n).labels
    assert hard.dtype == torch.int16 and hard.numel() * hard.element_size() == n * 2 == 2_562_334
    soft = ConstrainedKMeans(5000, 4, n, stage=1)
    assert sum(b.numel() * b.element_size() for b in (soft.labels, soft.label_weights)) == n * 5 * (2 + 4)
    assert compact_label_dtype(5000) == torch.int16
    assert compact_label_dtype(32767) == torch.int16
    assert compact_label_dtype(32768) == torch.int32


# ---------------------------------------------------------------------------------------------
# Vectorised updates against per-sample loops


def test_vectorised_updates_match_loops() -> None:
    g = torch.Generator().manual_seed(4)
    k, d = 7, 5
    centers = random_unit(k, d, g)
    duals, counters = torch.zeros(k), torch.zeros(k)
    ref_centers, ref_duals, ref_counters = centers.clone(), [0.0] * k, [0.0] * k
    for step in range(6):
        feats = random_unit(16, d, g)
        labels = assign_clusters(feats, centers, duals)
        scores = [[float(feats[i] @ centers[c]) + float(duals[c]) for c in range(k)] for i in range(16)]
        assert labels.tolist() == [max(range(k), key=lambda c, s=s: (s[c], -c)) for s in scores]
        renorm = step % 2 == 0
        duals = dual_update(duals, labels, k, lr=20.0, ratio=0.4)
        centers, counters = center_update(centers, counters, feats, labels, renorm)
        ref_duals = loop_dual_update(ref_duals, labels.tolist(), 20.0, 0.4)
        ref_centers, ref_counters = loop_center_update(
            ref_centers, ref_counters, feats, labels.tolist(), renorm
        )
        assert torch.allclose(duals, torch.tensor(ref_duals), atol=1e-5)
        assert torch.allclose(centers, ref_centers, atol=1e-6)
        assert counters.tolist() == ref_counters
        ref_centers = centers.clone()  # keep both on the same assignments despite float rounding


def test_vectorised_label_memory_matches_loop() -> None:
    g = torch.Generator().manual_seed(5)
    n, slots, k, stage = 20, 3, 4, 2
    labels, weights = torch.ones(n, slots, dtype=torch.int16), torch.zeros(n, slots)
    ref_labels, ref_weights = [[1] * slots for _ in range(n)], torch.zeros(n, slots)
    for epoch in range(stage, stage + 6):
        order = torch.randperm(n, generator=g)
        for batch in order.split(7):
            rows = torch.cat([batch, batch[:2]])  # padded duplicates with (possibly) different labels
            new = torch.randint(0, k, (rows.numel(),), generator=g)
            update_label_memory(labels, weights, rows, new, epoch, stage)
            loop_label_memory(ref_labels, ref_weights, rows.tolist(), new.tolist(), epoch, stage)
        assert torch.allclose(weights, ref_weights, atol=1e-6)
        live = ref_weights > 0
        assert torch.equal(labels.long()[live], torch.tensor(ref_labels)[live])
        assert torch.allclose(weights.sum(1), torch.ones(n), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Distributed equivalence and duplicates


def test_two_rank_halves_gathered_equal_the_whole_batch() -> None:
    """Each "rank" sees only its half of the batch, gathers, and updates its own state copy."""
    g = torch.Generator().manual_seed(6)
    n_local, k, d, world, num_ins = 8, 5, 4, 2, 64
    init = random_unit(k, d, g)

    def fresh_state() -> dict[str, torch.Tensor]:
        return {
            "centers": init.clone(),
            "duals": torch.zeros(k),
            "counters": torch.zeros(k),
            "memory": torch.zeros(num_ins, dtype=torch.int16),
        }

    whole, ranks = fresh_state(), [fresh_state() for _ in range(world)]
    for epoch in range(3):
        whole["counters"].zero_()
        for state in ranks:
            state["counters"].zero_()
        for ids in torch.randperm(num_ins, generator=g).split(n_local * world):
            feats = random_unit(ids.numel(), d, g)
            local_ids, local_feats = ids.chunk(world), feats.chunk(world)
            gathered_ids, gathered_feats = torch.cat(local_ids), torch.cat(local_feats)  # all_gather
            per_rank_targets = []
            for rank, state in enumerate(ranks):
                fresh = assign_clusters(gathered_feats, state["centers"], state["duals"])
                mine = fresh[rank * n_local : (rank + 1) * n_local]
                per_rank_targets.append(previous_labels(state["memory"], local_ids[rank], mine, epoch))
                state["duals"] = dual_update(state["duals"], fresh, k)
                state["centers"], state["counters"] = center_update(
                    state["centers"], state["counters"], gathered_feats, fresh
                )
                store_labels(state["memory"], gathered_ids, fresh)
            fresh = assign_clusters(feats, whole["centers"], whole["duals"])
            whole_targets = previous_labels(whole["memory"], ids, fresh, epoch)
            whole["duals"] = dual_update(whole["duals"], fresh, k)
            whole["centers"], whole["counters"] = center_update(
                whole["centers"], whole["counters"], feats, fresh
            )
            store_labels(whole["memory"], ids, fresh)
            assert torch.equal(torch.cat(per_rank_targets), whole_targets)
            for state in ranks:
                for name in whole:
                    assert torch.equal(state[name], whole[name]), name
        for state in (whole, *ranks):
            state["centers"] = average_centers(state["centers"], state["centers"], epoch)[0]


def test_duplicate_indices_last_write_wins() -> None:
    memory = torch.zeros(5, dtype=torch.int16)
    store_labels(memory, torch.tensor([3, 1, 3, 0, 3]), torch.tensor([7, 2, 8, 4, 9]))
    assert memory.tolist() == [4, 2, 0, 9, 0]
    labels, weights = torch.ones(4, 3, dtype=torch.int16), torch.zeros(4, 3)
    update_label_memory(labels, weights, torch.tensor([2, 2]), torch.tensor([5, 6]), epoch=0, stage=0)
    assert labels[2, 0].item() == 6 and weights[2].tolist() == [1.0, 0.0, 0.0]
    update_label_memory(labels, weights, torch.tensor([2, 2]), torch.tensor([6, 5]), epoch=1, stage=0)
    held = {int(lab): float(w) for lab, w in zip(labels[2], weights[2]) if w > 0}
    assert held == {6: 0.5, 5: 0.5}


def test_state_updates_stay_float32_under_autocast() -> None:
    g = torch.Generator().manual_seed(7)
    feats, centers = random_unit(32, 16, g), random_unit(9, 16, g)
    duals = torch.rand(9, generator=g) * 0.01
    expected_labels = assign_clusters(feats, centers, duals)
    expected = center_update(centers, torch.zeros(9), feats, expected_labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels = assign_clusters(feats, centers, duals)
        new_centers, _ = center_update(centers, torch.zeros(9), feats, labels)
    assert torch.equal(labels, expected_labels)
    assert new_centers.dtype == torch.float32 and torch.equal(new_centers, expected[0])
