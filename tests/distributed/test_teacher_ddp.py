"""2 CPU processes under Lightning DDP: the data2vec EMA teacher is identical on both ranks.

Each rank builds its module from a *different* seed; Lightning's DDP broadcast must make students
and teachers equal, and the per-step EMA must keep them equal although every rank draws its own
masks and crops.
"""

import os
import socket
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from synthetic import NoiseImages

from ssl.backbones.factory import build_backbone
from ssl.data.datamodule import PretrainDataModule
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.data2vec import Data2Vec

pytestmark = pytest.mark.distributed

DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5] * 3, "std": [0.25] * 3,
})




class TeacherSpread(pl.Callback):
    """Max |difference| between ranks of the flattened teacher and student, at start and per step."""

    def __init__(self) -> None:
        self.spread: list[tuple[float, float]] = []

    @staticmethod
    def across_ranks(tensors) -> float:
        vector = torch.cat([t.detach().flatten() for t in tensors])
        gathered = [torch.zeros_like(vector) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, vector)
        return float((gathered[0] - gathered[1]).abs().max())

    def record(self, module: SSLModule) -> None:
        self.spread.append((self.across_ranks(module.teacher.parameters()),
                            self.across_ranks(module.backbone.parameters())))

    def on_train_start(self, trainer, module) -> None:
        self.record(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.record(module)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", GROUP_RANK="0", TORCHELASTIC_RUN_ID="t")
    torch.manual_seed(100 + rank)  # different initial weights on each rank
    backbone = build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 4, "drop_path_rate": 0.1,
        "kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}))
    objective = Data2Vec(backbone, **recipe_settings("data2vec", image_size=16, top_k=2))
    optim = OmegaConf.load("conf/optimizer/data2vec.yaml")
    module = SSLModule(backbone, {"data2vec": objective}, {"data2vec": 1.0}, optim, batch_size=4)
    data = PretrainDataModule(DATASET, objective.view_spec(), 4, 0, dataset=NoiseImages(32),
                              maskers=objective.batch_maskers())
    spread = TeacherSpread()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[spread])
    trainer.fit(module, datamodule=data)
    torch.save(spread.spread, f"{out}.{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_teachers_identical_on_both_ranks(tmp_path: Path) -> None:
    out = str(tmp_path / "spread")
    mp.spawn(worker, args=(free_port(), out), nprocs=2, join=True)
    spreads = [torch.load(f"{out}.{r}") for r in range(2)]
    assert spreads[0] == spreads[1] and len(spreads[0]) == 4  # start + 3 steps
    for teacher_spread, student_spread in spreads[0]:
        assert teacher_spread == 0.0 and student_spread == 0.0
