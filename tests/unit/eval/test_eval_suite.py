"""The evaluation suite's pieces: feature parts, k-NN grid, variant sweep, cache, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.eval.cache import FeatureCache, cache_key
from ssl.eval.feature_parts import (
    VIT_VARIANTS,
    assemble,
    available_variants,
    part_encoder,
    parts_of,
    primary_part,
    resolve_variants,
)
from ssl.eval.knn_classifier import knn_grid_scores, knn_predict_scores
from ssl.eval.linear_probe import linear_probe_variants
from ssl.eval.report import flat_metrics, output_path


def tiny_vit(depth: int = 2):
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
        "kwargs": {"depth": depth},
    })).eval()


def test_vit_parts_match_the_backbone_features() -> None:
    torch.manual_seed(0)
    backbone = tiny_vit(depth=5)
    images = torch.randn(3, 3, 16, 16)
    parts = part_encoder(backbone, ["cls", "avgpool", "last4"])(images)
    features = backbone.forward_features(images)
    assert torch.allclose(parts["cls"], features.global_vector, atol=1e-6)
    assert torch.allclose(parts["avgpool"], features.patch_tokens.mean(dim=1), atol=1e-6)
    assert parts["last4"].shape == (3, 4 * 192)
    assert torch.allclose(parts["last4"][:, -192:], parts["cls"], atol=1e-6)  # the last block's CLS
    # The third-from-last block's CLS, through the final norm (dinov2's intermediate layers).
    tokens, _ = backbone.patch_embed(images)
    x = backbone.add_prefix(tokens)
    for block in backbone.model.blocks[:2]:
        x = block(x)
    assert torch.allclose(parts["last4"][:, :192], backbone.model.norm(x)[:, 0], atol=1e-5)
    assert assemble(parts, "cls+avgpool").shape == (3, 384)


def test_variants_per_encoder() -> None:
    vit = tiny_vit()
    assert available_variants(vit) == VIT_VARIANTS and primary_part(vit) == "cls"
    assert resolve_variants(vit, "auto") == list(VIT_VARIANTS)
    assert parts_of(["cls+avgpool", "last4+avgpool"]) == ["cls", "avgpool", "last4"]
    pixels = lambda x: x.flatten(1)  # noqa: E731
    assert resolve_variants(pixels, None) == ["global"] and primary_part(pixels) == "global"
    with pytest.raises(ValueError, match="valid: global"):
        resolve_variants(pixels, ["cls"])


def test_knn_grid_equals_one_knn_per_pair() -> None:
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 8, generator=generator), torch.randn(50, 8, generator=generator)
    labels = torch.randint(0, 5, (300,), generator=generator)
    grid = knn_grid_scores(train, labels, test, 5, ks=(3, 10, 20), temperatures=(0.07, 0.5), chunk_size=16)
    assert set(grid) == {(k, t) for k in (3, 10, 20) for t in (0.07, 0.5)}
    for (k, t), scores in grid.items():
        assert torch.allclose(scores, knn_predict_scores(train, labels, test, 5, k, t), rtol=1e-5, atol=1e-6)


def test_knn_grid_scores_each_k_beyond_a_small_bank_once() -> None:
    generator = torch.Generator().manual_seed(0)
    train, test = torch.randn(12, 4, generator=generator), torch.randn(7, 4, generator=generator)
    labels = torch.arange(12) % 3
    grid = knn_grid_scores(train, labels, test, 3, ks=(10, 20, 100), temperatures=(0.07,))
    assert set(grid) == {(10, 0.07), (12, 0.07)}
    assert all(scores.shape == (7, 3) for scores in grid.values())


def test_variant_sweep_picks_the_informative_features() -> None:
    generator = torch.Generator().manual_seed(0)
    y_train = torch.randint(0, 3, (600,), generator=generator)
    y_test = torch.randint(0, 3, (200,), generator=generator)
    centres = torch.randn(3, 6, generator=generator) * 4
    noise = (torch.randn(600, 6, generator=generator), torch.randn(200, 6, generator=generator))
    signal = (centres[y_train] + torch.randn(600, 6, generator=generator),
              centres[y_test] + torch.randn(200, 6, generator=generator))
    result = linear_probe_variants({"noise": noise, "signal": signal}, y_train, y_test,
                                   lrs=[0.01, 0.1], weight_decays=[0.0], epochs=5, batch_size=64)
    assert result.variant == "signal" and result.top1 > 90
    assert result.variants["noise"] < 60 < result.variants["signal"]
    assert len(result.grid) == 4 and {g["variant"] for g in result.grid} == {"noise", "signal"}


def test_feature_cache_round_trip_and_keys(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path)
    base = {"encoder": {"kind": "pixels"}, "split": "train", "part": "global"}
    key = cache_key(base)
    assert key == cache_key(dict(base)) and key != cache_key({**base, "split": "test"})
    assert cache.load(key) is None and cache.misses == 1
    cache.save(key, {"features": torch.ones(2, 3), "labels": torch.tensor([0, 1])}, base)
    entry = cache.load(key)
    assert cache.hits == 1 and torch.equal(entry["features"], torch.ones(2, 3))
    assert json.loads((tmp_path / f"{key}.json").read_text())["split"] == "train"
    (tmp_path / f"{key}.pt").write_bytes(b"not a tensor file")  # a damaged entry is a miss, not a crash
    assert cache.load(key) is None
    assert FeatureCache(None).load(key) is None


def test_report_paths_and_metrics(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    auto = OmegaConf.create({"output": "auto", "checkpoint": str(ckpt)})
    assert output_path(auto, "knn") == ckpt.with_name("last.knn.json")
    assert output_path(OmegaConf.create({"output": "auto", "checkpoint": None}), "knn") is None
    assert output_path(OmegaConf.create({"output": "x.json"}), "knn") == Path("x.json")
    flat = flat_metrics({"top1": 80.0, "k": {"20": {"top1": 70.0}}, "grid": [1, 2], "retrained": True})
    assert flat == {"top1": 80.0, "k/20/top1": 70.0}


fashion = pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs dataset-fashion-mnist")


def eval_cfg(tmp_path: Path, **extra) -> OmegaConf:
    dataset = OmegaConf.load("conf/dataset/fashion_mnist.yaml")
    dataset.image_size = 16
    backbone = {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": None,
                "kwargs": {"depth": 2}}
    cfg = {"dataset": dataset, "backbone": backbone, "checkpoint": None, "pixels": False,
           "weights": "teacher",
           "batch_size": 128, "max_train_samples": 256, "max_test_samples": 128, "num_workers": 0, "seed": 0,
           "device": "cpu", "cache": True, "cache_dir": str(tmp_path / "cache"), **extra}
    return OmegaConf.create(cfg)


@fashion
def test_features_are_extracted_once_then_read_from_the_cache(tmp_path: Path) -> None:
    from ssl.eval.encoder import labelled_features

    cfg = eval_cfg(tmp_path)
    first = labelled_features(cfg, "test", parts=["cls"])
    assert first.cached == {"train/cls": "miss", "test/cls": "miss"} and first.images_per_s > 0
    second = labelled_features(cfg, "test", parts=["cls", "avgpool"])
    assert second.cached == {
        "train/cls": "hit", "train/avgpool": "miss", "test/cls": "hit", "test/avgpool": "miss",
    }
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.train_y, second.train_y)
    third = labelled_features(cfg, "test", parts=["avgpool", "cls"])
    assert set(third.cached.values()) == {"hit"} and third.images_per_s is None
    other_seed = labelled_features(eval_cfg(tmp_path, seed=1), "test", parts=["cls"])
    assert set(other_seed.cached.values()) == {"miss"}  # another random init is another encoder


def test_random_init_depends_on_the_seed_only_and_leaves_the_rng_alone() -> None:
    from ssl.eval.encoder import seeded_random_init

    spec = OmegaConf.create({"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4,
                             "drop_path_rate": None, "kwargs": {"depth": 1}})
    first = seeded_random_init(spec, 3).state_dict()
    torch.rand(1000)  # whatever ran before (building an objective, another reference) draws from the RNG
    state = torch.random.get_rng_state()
    again = seeded_random_init(spec, 3).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = seeded_random_init(spec, 4).state_dict()
    assert not all(torch.equal(first[k], other[k]) for k in first)


@fashion
def test_a_cached_random_init_bank_matches_the_encoder_built_later(tmp_path: Path) -> None:
    """The degradation analysis builds its untrained reference after other RNG use, then reads the
    train bank from the cache: both must be the same weights (they once were not: k-NN at chance)."""
    from ssl.eval.encoder import labelled_features, resolve_encoder

    cfg = eval_cfg(tmp_path)
    cached = labelled_features(cfg, "test", parts=["cls"])
    torch.rand(1000)
    fresh_cfg = eval_cfg(tmp_path, cache=False)
    fresh = labelled_features(fresh_cfg, "test", parts=["cls"], encoder_info=resolve_encoder(fresh_cfg))
    assert torch.allclose(cached.train_x, fresh.train_x, atol=1e-5)


@fashion
def test_dino_protocol_runs_on_augmented_crops(tmp_path: Path) -> None:
    from ssl.eval.linear import evaluate

    probe = {"protocol": "dino", "momentum": 0.9,
             "dino": {"epochs": 1, "lr": 0.001, "batch_size": 64, "weight_decay": 0.0, "variant": "auto"}}
    result = evaluate(eval_cfg(tmp_path, probe=probe))
    assert result["protocol"] == "dino" and result["variant"] == "last4"
    assert result["feature_dim"] == 2 * 192 and result["train_size"] == 256  # depth 2: both blocks' CLS
    assert 0.0 <= result["top1"] <= 100.0 and result["test_size"] == 10_000


def test_publish_writes_json_and_an_offline_wandb_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ssl.eval.report import publish

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = OmegaConf.create({"output": str(tmp_path / "r.json"), "checkpoint": None,
                            "wandb": {"enabled": True, "project": "t", "entity": None, "mode": "offline"}})
    path = publish(cfg, {"top1": 81.5, "k": {"20": {"top1": 80.0}}}, "knn")
    assert json.loads(path.read_text())["top1"] == 81.5
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
