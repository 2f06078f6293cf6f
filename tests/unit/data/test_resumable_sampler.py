"""The pieces of exact resume without a training run: sampler order, seeded samples, RNG states."""

from __future__ import annotations

import random

import numpy as np
import torch
from omegaconf import OmegaConf
from synthetic import NoiseImages, three_classes

from ssl.callbacks.rng_state import capture_rng_state, restore_rng_state
from ssl.data.datamodule import PretrainDataModule
from ssl.data.masking import RandomTokenMasker
from ssl.data.resumable_sampler import ResumableSampler, sample_seed
from ssl.data.spec import ViewSpec

DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
})




def test_the_order_depends_on_seed_and_epoch_only_and_resumes_inside_an_epoch() -> None:
    sampler = ResumableSampler(10, seed=3)
    sampler.set_epoch(1)
    full = list(sampler)
    assert sorted(i for i, _ in full) == list(range(10))
    assert [i for i, _ in full] == ResumableSampler(10, seed=3).indices(1)
    sampler.resume_at(1, 4)
    assert list(sampler) == full[4:]
    assert list(sampler) == full  # the skip applies to one pass only
    sampler.set_epoch(2)
    assert list(sampler) != full
    assert full[0][1] == sample_seed(3, 1, full[0][0])


def test_ranks_get_disjoint_shards_like_distributed_sampler() -> None:
    shards = [[i for i, _ in ResumableSampler(10, num_replicas=2, rank=r)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert sorted(shards[0] + shards[1]) == list(range(10))


def loader_batches(num_workers: int, skip_batches: int = 0) -> list[dict]:
    data = PretrainDataModule(DATASET, ViewSpec(2, 2), batch_size=4, num_workers=num_workers,
                              dataset=NoiseImages(24, label=three_classes),
                              maskers=[RandomTokenMasker(16, 0.5, prefix="mae")], seed=7)
    if skip_batches:
        data.load_state_dict({"epoch": 0, "batches_done": skip_batches, "batch_size": 4})
    torch.manual_seed(123)  # the process's RNG must not matter
    return list(data.train_dataloader())


def same_batch(a: dict, b: dict) -> bool:
    """Every tensor of two batches equal (views are a list of per-crop tensors)."""
    if a.keys() != b.keys():
        return False
    flat = [(x, y) for k in a for x, y in (zip(a[k], b[k], strict=True) if isinstance(a[k], list)
                                             else [(a[k], b[k])])]
    return all(torch.equal(x, y) for x, y in flat)


def test_views_and_masks_are_the_same_for_any_worker_count_and_after_a_resume() -> None:
    plain, workers, resumed = loader_batches(0), loader_batches(2), loader_batches(0, skip_batches=2)
    assert len(plain) == 6 and len(resumed) == 4
    assert "_sample_seed" not in plain[0] and "mae_mask" in plain[0] and len(plain[0]["views"]) == 4
    assert all(same_batch(a, b) for a, b in zip(plain, workers, strict=True))
    assert all(same_batch(a, b) for a, b in zip(plain[2:], resumed, strict=True))
    assert not same_batch(plain[0], plain[1])


def test_loading_leaves_the_global_rng_alone() -> None:
    data = PretrainDataModule(DATASET, ViewSpec(2, 2), batch_size=4, num_workers=0,
                              dataset=NoiseImages(24, label=three_classes))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    list(data.train_dataloader())
    assert torch.equal(torch.rand(3), expected)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path) -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    torch.save({"rng": capture_rng_state()}, tmp_path / "s.ckpt")
    expected = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    restore_rng_state(torch.load(tmp_path / "s.ckpt", weights_only=True)["rng"])
    got = (torch.rand(4), np.random.rand(4), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]
