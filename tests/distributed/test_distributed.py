"""2-process CPU (gloo) checks that cross-rank pieces equal one process on the global batch."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl.distributed import all_gather_cat
from ssl.losses.dino import dino_loss, updated_center

pytestmark = pytest.mark.distributed

WORLD = 2
K = 16


def global_teacher_logits() -> torch.Tensor:
    torch.manual_seed(123)
    return torch.randn(2 * 6, K)  # 2 global crops x 6 images, crop-major


def local_rows(logits: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank r holds images [3r, 3r+3) of each crop: the shard a DistributedSampler would give."""
    crops = logits.chunk(2)
    return torch.cat([c[3 * rank : 3 * rank + 3] for c in crops])


def worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        center = torch.full((1, K), 0.1)
        new_center = updated_center(center, local_rows(global_teacher_logits(), rank), 0.9)
        gathered = all_gather_cat(torch.arange(rank + 2, dtype=torch.float32)[:, None])
        torch.save({"center": new_center, "gathered": gathered}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_dino_center_and_gather_match_single_process(tmp_path: Path) -> None:
    results = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    single = updated_center(torch.full((1, K), 0.1), global_teacher_logits(), 0.9)
    for rank in range(WORLD):
        out = torch.load(f"{results}.{rank}", weights_only=True)
        assert torch.allclose(out["center"], single, atol=1e-6)
        # Uneven shard lengths (2 and 3 rows) come back whole and in rank order.
        assert out["gathered"].flatten().tolist() == [0.0, 1.0, 0.0, 1.0, 2.0]


def test_loss_uses_local_rows_only() -> None:
    """The DINO loss itself needs no communication: the per-rank mean equals the global mean."""
    teacher = global_teacher_logits()
    torch.manual_seed(5)
    student = torch.randn(3 * 6, K)  # 3 crops
    center = torch.zeros(1, K)
    full = dino_loss(student, teacher, center, 3)
    per_rank = []
    for rank in range(WORLD):
        s = torch.cat([c[3 * rank : 3 * rank + 3] for c in student.chunk(3)])
        per_rank.append(dino_loss(s, local_rows(teacher, rank), center, 3))
    assert torch.allclose(torch.stack(per_rank).mean(), full, atol=1e-6)


class Numbered(torch.utils.data.Dataset):
    """Image i is filled with the value i (label i % 3): features say which image they came from."""

    has_labels = True

    def __len__(self) -> int:
        return 11

    def __getitem__(self, index: int):
        from PIL import Image

        return Image.new("RGB", (8, 8), (index, index, index)), index % 3


def feature_worker(rank: int, init_file: str, results: str) -> None:
    from omegaconf import OmegaConf

    from ssl.data.datamodule import clean_loader
    from ssl.eval.features import extract_features

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = OmegaConf.create({"image_size": 8, "mean": [0.0] * 3, "std": [1.0] * 3})
        loader = clean_loader(Numbered(), cfg, batch_size=2, num_workers=0, shard=(rank, WORLD))
        features, labels = extract_features(lambda x: x.mean(dim=(1, 2, 3))[:, None] * 255, loader)
        torch.save({"features": features, "labels": labels}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_knn_features_gathered_across_ranks_match_one_process(tmp_path: Path) -> None:
    """Each rank extracts a disjoint shard (6 and 5 images); every rank ends with all 11, once each,
    with features and labels still paired, as one process extracting everything."""
    results = str(tmp_path / "features")
    mp.spawn(feature_worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    outs = [torch.load(f"{results}.{rank}", weights_only=True) for rank in range(WORLD)]
    assert torch.equal(outs[0]["features"], outs[1]["features"])
    images = outs[0]["features"].round().long().flatten()
    assert sorted(images.tolist()) == list(range(11))
    assert torch.equal(outs[0]["labels"], images % 3)
