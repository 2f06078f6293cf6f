"""The shard stream under 2 gloo ranks: disjoint samples, equal steps, one checkpoint resumes both.

Lightning writes rank 0's copy of the data module's state; it must hold every rank's reader
positions (gathered when the checkpoint is made), so each rank resumes its own stream from it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit" / "data"))
from shard_samples import shard_config, write_shards  # noqa: E402
from test_shard_stream import checkpoint, module, take  # noqa: E402

pytestmark = pytest.mark.distributed

WORLD = 2


def worker(rank: int, pattern: str, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        cfg = shard_config(pattern, shuffle_buffer=6)
        whole = module(cfg, world=WORLD, rank=rank)
        whole.setup()
        uninterrupted = [b["index"].tolist() for b in take(whole, whole.train_dataloader())]
        killed = module(cfg, world=WORLD, rank=rank)
        killed.setup()
        head = [b["index"].tolist() for b in take(killed, killed.train_dataloader(), 3)]
        saved = checkpoint(killed, 0, 3)  # a collective: every rank makes it, as Lightning does
        written = [saved] if rank == 0 else [None]
        dist.broadcast_object_list(written, src=0)  # every rank reads rank 0's file
        resumed = module(cfg, world=WORLD, rank=rank)
        resumed.load_state_dict(written[0])
        tail = [b["index"].tolist() for b in take(resumed, resumed.train_dataloader())]
        out = {"uninterrupted": uninterrupted, "resumed": head + tail, "saved": saved}
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("shard_ddp")
    pattern = write_shards(tmp / "shards", count=40, per_shard=5)
    mp.spawn(worker, args=(pattern, str(tmp / "init"), str(tmp / "result")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=False) for r in range(WORLD)]


def test_ranks_read_disjoint_samples_in_equal_steps(ranks: list[dict[str, Any]]) -> None:
    steps = [len(r["uninterrupted"]) for r in ranks]
    assert steps[0] == steps[1] > 0
    seen = [i for r in ranks for batch in r["uninterrupted"] for i in batch]
    assert len(seen) == len(set(seen)) == 40  # 8 shards of 5 over 2 ranks: 4 batches of 4 each, no remainder


def test_one_checkpoint_resumes_every_rank(ranks: list[dict[str, Any]]) -> None:
    readers = ranks[0]["saved"]["stream"]["readers"]
    assert len(readers) == WORLD and all(readers)  # both ranks' positions in rank 0's copy
    assert ranks[0]["saved"] == ranks[1]["saved"]
    for r in ranks:
        assert r["resumed"] == r["uninterrupted"]
