"""2 CPU processes under Lightning DDP: a NaN loss on one rank only skips the step on both.

The injected NaN is a constant (no gradient), so the all-reduced gradients stay finite: only the
guard's cross-rank flag makes rank 0 skip too. Without it the ranks' weights would part.
"""

import os
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from test_module import Crops, tiny_module
from test_teacher_ddp import TeacherSpread, free_port
from torch.utils.data import DataLoader

pytestmark = pytest.mark.distributed


def worker(rank: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="t")
    module = tiny_module()
    dino = module.objectives["dino"]
    original = dino.loss

    def loss(batch, backbone, teacher, ctx):
        out = original(batch, backbone, teacher, ctx)
        if rank == 1 and ctx.step == 2:
            out.loss = out.loss + torch.tensor(float("nan"))  # no gradient: grads stay finite
        return out

    dino.loss = loss
    spread = TeacherSpread()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[spread])
    trainer.fit(module, DataLoader(Crops(), batch_size=4))
    torch.save({"spread": spread.spread, "skipped": module.guard.skipped}, f"{out}.{rank}")


def test_a_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    out = str(tmp_path / "result")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    assert [r["skipped"] for r in results] == [1, 1]
    assert len(results[0]["spread"]) == 5  # start + 4 steps
    for teacher_spread, student_spread in results[0]["spread"]:
        assert teacher_spread == 0.0 and student_spread == 0.0
