"""CoKe across ranks: 2 gloo processes with different local batches end with the same clustering
state as one process on the concatenated global batch, without any buffer broadcast."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from ssl.objectives import recipe_settings
from ssl.objectives.base import StepContext
from ssl.objectives.coke import CoKe

pytestmark = pytest.mark.distributed

WORLD = 2
DIM, N = 8, 40
STEPS_PER_EPOCH, EPOCHS = 4, 4


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per step: features [10, DIM] and instance indices; the last step repeats an index (padding)."""
    torch.manual_seed(7)
    batches = []
    for _ in range(EPOCHS):
        order = torch.randperm(N)
        for step in range(STEPS_PER_EPOCH):
            indices = order[10 * step : 10 * step + 10].clone()
            if step == STEPS_PER_EPOCH - 1:
                indices[-1] = indices[0]  # DistributedSampler pads with duplicates
            batches.append((F.normalize(torch.randn(10, DIM), dim=1), indices))
    return batches


def rank_rows(rank: int) -> slice:
    """Uneven shards (4 and 6 rows) also work: ranks contribute in order."""
    return slice(0, 4) if rank == 0 else slice(4, 10)


def build() -> CoKe:
    torch.manual_seed(0)  # the same initial centres everywhere (pretrain seeds every rank alike)
    return CoKe(DIM, **recipe_settings("coke", num_samples=N, num_clusters=[3, 5], out_dim=DIM, stage=2))


def run(coke: CoKe, rank: int | None) -> list[torch.Tensor]:
    """Drive the clustering through every step and epoch end; returns the targets it produced."""
    targets = []
    for i, (features, indices) in enumerate(global_batches()):
        epoch = i // STEPS_PER_EPOCH
        rows = slice(None) if rank is None else rank_rows(rank)
        out = coke.cluster(features[rows], indices[rows], epoch)
        targets.extend(t.float() for t in out)
        if (i + 1) % STEPS_PER_EPOCH == 0:
            coke.on_train_epoch_end(StepContext(epoch=epoch))
    return targets


def worker(rank: int, init_file: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        coke = build()
        targets = run(coke, rank)
        torch.save({"state": coke.state_dict(), "targets": targets}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_the_single_process_state(tmp_path: Path) -> None:
    results = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    single = build()
    single_targets = run(single, None)
    expected = single.state_dict()
    assert int(expected["clusterings.0.labels"][:, 0].min()) >= 0  # every instance was assigned
    for rank in range(WORLD):
        out = torch.load(f"{results}.{rank}", weights_only=True)
        for key, value in expected.items():
            if key.startswith("clusterings."):
                assert torch.allclose(out["state"][key].float(), value.float(), atol=1e-6), (rank, key)
        # Each rank trains on its own rows of the single-process targets (hard and stage-2 soft).
        for mine, full in zip(out["targets"], single_targets):
            assert torch.allclose(mine, full[rank_rows(rank)], atol=1e-6)
