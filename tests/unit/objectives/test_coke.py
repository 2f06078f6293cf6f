"""CoKe objective: clustering state through the objective, variants, checkpoints, bad configs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.errors import IncompatibleConfigError
from ssl.losses.coke import cluster_logits, multi_crop_loss, single_view_loss
from ssl.objectives import recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.coke import CoKe, default_cluster_counts
from ssl.objectives.coke_clustering import UNASSIGNED, ConstrainedKMeans


def resnet18():
    return build_backbone(OmegaConf.create({
        "name": "resnet18", "img_size": 28, "patch_size": 4, "drop_path_rate": None,
        "small_image_stem": None, "kwargs": {},
    }))


def tiny_vit():
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
        "kwargs": {"depth": 1},
    }))


def unit(*rows: list[float]) -> torch.Tensor:
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


# ------------------------------------------------------------------------------ clustering head
def test_dual_update_and_centres_through_the_clustering_head() -> None:
    """methods.md 6.12: duals [0, 0, 2, 2] after labels [0, 0, 0, 1]; centres by running means."""
    kmeans = ConstrainedKMeans(4, 2, num_samples=10, dual_lr=20, ratio=0.4)
    kmeans.update(unit([1, 0], [1, 0], [1, 0], [0, 1]), torch.arange(4), torch.tensor([0, 0, 0, 1]), epoch=0)
    assert torch.allclose(kmeans.duals, torch.tensor([0.0, 0.0, 2.0, 2.0]))

    kmeans = ConstrainedKMeans(2, 2, num_samples=10)
    first = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    kmeans.update(first, torch.arange(3), torch.tensor([0, 1, 1]), 0)
    assert torch.allclose(kmeans.cur_centers[1], torch.tensor([0.316228, 0.948683]), atol=1e-6)
    kmeans.update(torch.tensor([[0.8, 0.6]]), torch.tensor([3]), torch.tensor([0]), 0)
    assert torch.allclose(kmeans.cur_centers[0], torch.tensor([0.948683, 0.316228]), atol=1e-6)
    assert kmeans.counters.tolist() == [2, 2]


def test_duals_flip_the_assignment() -> None:
    kmeans = ConstrainedKMeans(2, 2, num_samples=4)
    kmeans.cur_centers.copy_(unit([1, 0], [0, 1]))
    x = unit([0.8, 0.6])  # closer to centre 0 (0.8 vs 0.6)
    assert kmeans.assign(x, epoch=0).tolist() == [0]
    kmeans.duals.copy_(torch.tensor([0.0, 0.3]))
    assert kmeans.assign(x, epoch=0).tolist() == [1]


def test_label_lag_fresh_in_epoch_zero_previous_label_later() -> None:
    """Epoch 0 trains on the fresh assignment; epoch 1 on epoch 0's label while the memory moves on."""
    kmeans = ConstrainedKMeans(2, 2, num_samples=4)
    kmeans.cur_centers.copy_(unit([1, 0], [0, 1]))
    index = torch.tensor([2])
    fresh = kmeans.assign(unit([1, 0.1]), 0)
    assert kmeans.targets(index, fresh, 0).tolist() == [0]
    kmeans.update(unit([1, 0.1]), index, fresh, 0)
    kmeans.end_epoch(0)
    fresh = kmeans.assign(unit([0.1, 1]), 1)
    assert fresh.tolist() == [1]
    assert kmeans.targets(index, fresh, 1).tolist() == [0]  # the label of epoch 0
    kmeans.update(unit([0.1, 1]), index, fresh, 1)
    assert kmeans.labels[2, 0].item() == 1
    # An image never assigned before (e.g. dropped by drop_last in epoch 0) uses its fresh label.
    assert kmeans.labels[3, 0].item() == UNASSIGNED
    assert kmeans.targets(torch.tensor([3]), torch.tensor([1]), 1).tolist() == [1]


def test_end_of_epoch_moves_centres_to_the_classifier_and_resets_counters() -> None:
    kmeans = ConstrainedKMeans(3, 2, num_samples=6)
    before = kmeans.pre_centers.clone()
    kmeans.update(unit([1, 0], [0, 1], [1, 1]), torch.arange(3), torch.tensor([0, 1, 2]), 0)
    assert torch.equal(kmeans.pre_centers, before)  # fixed during the epoch
    stats = kmeans.end_epoch(0)
    assert torch.equal(kmeans.pre_centers, kmeans.cur_centers)
    assert torch.allclose(kmeans.pre_centers, unit([1, 0], [0, 1], [1, 1]))
    assert kmeans.counters.tolist() == [0, 0, 0]
    assert stats["min_cluster_size"] == 1 and stats["max_cluster_size"] == 1
    assert math.isclose(float(stats["size_lower_bound"]), 3 * 0.4 / 3, rel_tol=1e-6)


def test_stage_two_soft_labels_from_the_history() -> None:
    """History a (stage epoch), a, b: weights a 2/3, b 1/3; target exp(w / 0.5) normalised on {a, b}."""
    stage, a, b, c = 2, 1, 3, 2
    kmeans = ConstrainedKMeans(4, 2, num_samples=5, stage=stage, slots=5)
    index = torch.tensor([4])
    kmeans.update(unit([1, 0]), index, torch.tensor([c]), 1)
    # At the stage epoch itself the loss still uses the hard label of the previous epoch.
    assert kmeans.targets(index, torch.tensor([0]), epoch=stage).tolist() == [c]
    for epoch, label in [(2, a), (3, a), (4, b)]:
        kmeans.update(unit([1, 0]), index, torch.tensor([label]), epoch)
    target = kmeans.targets(index, torch.tensor([0]), epoch=5)
    expected = torch.zeros(4)
    expected[a], expected[b] = math.exp((2 / 3) / 0.5), math.exp((1 / 3) / 0.5)
    assert torch.allclose(target[0], expected / expected.sum(), atol=1e-6)


def test_label_memory_is_compact() -> None:
    assert ConstrainedKMeans(5000, 8, num_samples=10).labels.dtype == torch.int16
    assert ConstrainedKMeans(40000, 8, num_samples=10).labels.dtype == torch.int32
    assert ConstrainedKMeans(10, 8, num_samples=7).labels.shape == (7, 1)
    assert ConstrainedKMeans(10, 8, num_samples=7, stage=3).label_weights.shape == (7, 5)


# ------------------------------------------------------------------------------ objective
def small_batch(views: int, size: int = 28, b: int = 6, small: int = 0, offset: int = 0) -> dict:
    crops = [torch.randn(b, 3, size, size) for _ in range(views)]
    crops += [torch.randn(b, 3, 12, 12) for _ in range(small)]
    return {"views": crops, "index": torch.arange(b) + offset}


def test_default_cluster_counts_scale_with_the_dataset() -> None:
    assert default_cluster_counts(1_281_167) == [3000, 4000, 5000]
    assert default_cluster_counts(60_000) == [140, 187, 234]
    assert default_cluster_counts(100) == [10, 10, 10]


def test_single_view_loss_is_the_predictor_branch_against_the_previous_centres() -> None:
    torch.manual_seed(0)
    backbone = resnet18()
    coke = CoKe(backbone.embed_dim, **recipe_settings("coke", num_samples=20, num_clusters=[4, 5]))
    assert coke.temperature == 0.1 and coke.beta == 1.0  # the released single-view run
    assert coke.head.projector[0].out_features == 512  # hidden width = the backbone's width
    backbone.eval(), coke.eval()  # deterministic BN so the check can redo the forward
    batch = small_batch(1)
    out = coke.loss(batch, backbone, None, StepContext(epoch=1))
    proj, pred = coke.head(backbone(batch["views"][0]))
    # No earlier epoch assigned these images, so the targets are the fresh labels now in the memory.
    stored = [c.labels[batch["index"], 0].long() for c in coke.clusterings]
    logits = [cluster_logits(pred, c.pre_centers, 0.1) for c in coke.clusterings]
    plogits = [cluster_logits(proj, c.pre_centers, 0.1) for c in coke.clusterings]
    expected = single_view_loss(logits, plogits, stored, beta=1.0)
    assert torch.allclose(out.loss, expected, atol=1e-5)
    out.loss.backward()
    assert all(c.pre_centers.grad is None for c in coke.clusterings)
    assert coke.head.predictor[0].weight.grad is not None
    assert {"target_accuracy", "dual_max"} <= set(out.metrics)


def test_multi_crop_variant_composes_large_and_small_view_losses() -> None:
    torch.manual_seed(1)
    backbone = resnet18()
    coke = CoKe(backbone.embed_dim, **recipe_settings(
        "coke", num_samples=20, num_clusters=[4], variant="multi", small_crops=2,
    ))
    assert coke.temperature == 0.05 and coke.beta == 0.5
    spec = coke.view_spec()
    assert (spec.global_crops, spec.local_crops, spec.crop_recipe.name) == (2, 2, "coke")
    backbone.eval(), coke.eval()
    batch = small_batch(2, small=2)
    before = copy.deepcopy(coke.clusterings[0])
    out = coke.loss(batch, backbone, None, StepContext(epoch=0))
    heads = [coke.head(backbone(c)) for c in batch["views"]]
    centers = coke.clusterings[0].pre_centers
    lg = [(cluster_logits(h[1], centers, 0.05), cluster_logits(h[0], centers, 0.05)) for h in heads]
    labels = [coke.clusterings[0].labels[batch["index"], 0].long()]
    expected = multi_crop_loss(
        [lg[0][0]], [lg[1][0]], [lg[0][1]], [lg[1][1]], [[lg[2][0], lg[3][0]]], [[lg[2][1], lg[3][1]]],
        labels, alpha=0.2, beta=0.5,
    )
    assert torch.allclose(out.loss, expected, atol=1e-5)
    # The clustering feature is the mean of the two large views' projections.
    mean = (heads[0][0] + heads[1][0]) / 2
    assert torch.equal(labels[0], before.assign(mean, 0))


def test_two_view_variant_on_a_vit() -> None:
    torch.manual_seed(2)
    backbone = tiny_vit()
    coke = CoKe(backbone.embed_dim, **recipe_settings(
        "coke", num_samples=12, num_clusters=[3], variant="two",
    ))
    for epoch in range(2):
        out = coke.loss(small_batch(2, size=16), backbone, None, StepContext(epoch=epoch))
        assert torch.isfinite(out.loss)
        out.loss.backward()
        coke.on_train_epoch_end(StepContext(epoch=epoch))
    assert coke.clusterings[0].labels[:6, 0].min() >= 0


def test_state_round_trips_through_a_state_dict() -> None:
    torch.manual_seed(3)
    backbone = resnet18()
    coke = CoKe(backbone.embed_dim, **recipe_settings("coke", num_samples=20, num_clusters=[4, 6], stage=1))
    coke.loss(small_batch(1), backbone, None, StepContext(epoch=0))
    coke.on_train_epoch_end(StepContext(epoch=0))
    coke.loss(small_batch(1, offset=6), backbone, None, StepContext(epoch=1))
    state = coke.state_dict()
    for key in ("pre_centers", "cur_centers", "duals", "counters", "labels", "label_weights"):
        assert f"clusterings.1.{key}" in state
    assert state["clusterings.0.labels"].dtype == torch.int16
    restored = CoKe(backbone.embed_dim, **recipe_settings(
        "coke", num_samples=20, num_clusters=[4, 6], stage=1,
    ))
    restored.load_state_dict(state)
    for mine, theirs in zip(coke.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"num_clusters": [30]}, "number of training images"),
    ({"variant": "triple"}, "valid: single, two, multi"),
    ({"variant": "two", "stage": 5}, "single-view recipe"),
])
def test_bad_settings_fail_with_advice(kwargs: dict, message: str) -> None:
    with pytest.raises(IncompatibleConfigError, match=message):
        CoKe(64, **recipe_settings("coke", num_samples=20, **kwargs))


def test_from_config_needs_the_dataset_size() -> None:
    cfg = OmegaConf.load("conf/objective/coke.yaml")
    with pytest.raises(IncompatibleConfigError, match="num_samples"):
        CoKe.from_config(cfg, resnet18())
    cfg.num_samples = 500
    coke = CoKe.from_config(cfg, resnet18())
    assert [c.num_clusters for c in coke.clusterings] == [10, 10, 10]
    assert coke.view_spec().crop_recipe.name == "coke_single_view"


def test_cluster_size_report() -> None:
    from ssl.eval.clusters import cluster_size_report

    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1 + [-1] * 5)
    report = cluster_size_report(labels, num_clusters=4, ratio=0.4)
    assert report["images"] == 10 and report["average_size"] == 2.5
    assert (report["min_size"], report["max_size"]) == (0, 6)
    assert report["lower_bound"] == pytest.approx(1.0)
    assert report["below_lower_bound"] == 1 and report["empty"] == 1  # cluster 3
    assert sum(report["histogram"].values()) == 4
    assert report["histogram"]["[2, 3)x avg"] == 1  # cluster 0 holds 2.4x the average


def test_sync_batchnorm_follows_the_recipe_only_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl.pretrain import resolve_sync_batchnorm

    coke = CoKe(64, **recipe_settings("coke", num_samples=100, num_clusters=[10]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_sync_batchnorm(OmegaConf.create({"accelerator": "auto"}), [coke])
    assert not resolve_sync_batchnorm(OmegaConf.create({"accelerator": "cpu"}), [coke])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not resolve_sync_batchnorm(OmegaConf.create({"accelerator": "auto"}), [coke])
