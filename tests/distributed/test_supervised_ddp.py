"""The mixed loss under 2-process CPU DDP (gloo) equals one process on the concatenated batch.

Each rank holds a different number of labelled rows (2 and 1; then 3 and 0), so a per-rank mean
would weigh them wrongly; masked_cross_entropy divides each rank's sum by the all-reduced count
(times the world size), so the gradient DDP applies (the mean of the rank gradients) is the
gradient of the mean over all labelled rows. Checked on `objective=[dino,supervised]`, through
SSLModule's training step, so DINO's share and the shared backbone pass are part of it.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from ssl.backbones.factory import build_backbone
from ssl.distributed import all_reduce_sum
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.dino import DINO
from ssl.objectives.supervised import Supervised

pytestmark = pytest.mark.distributed

WORLD, PER_RANK, IMAGE, LOCAL = 2, 3, 16, 8
LABELS = {"two_and_one": [1, -1, 2, -1, -1, 0], "three_and_none": [0, 2, 1, -1, -1, -1]}
TOL = {"rtol": 1e-5, "atol": 1e-6}


def build() -> SSLModule:
    torch.manual_seed(0)
    backbone = build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": IMAGE, "patch_size": 4, "drop_path_rate": 0.0,
        "kwargs": {"depth": 1, "embed_dim": 32, "num_heads": 2}}))
    dino = DINO(backbone.embed_dim, **recipe_settings(
        "dino", out_dim=16, hidden_dim=16, bottleneck_dim=8, local_crops=1))
    sup = Supervised(backbone.embed_dim, **recipe_settings("supervised", num_classes=3, label_smoothing=0.1))
    return SSLModule(backbone, {"dino": dino, "supervised": sup}, {"dino": 1.0, "supervised": 1.0}, None,
                     batch_size=PER_RANK)


def global_batch(case: str) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    views = [torch.randn(n, 3, IMAGE, IMAGE, generator=g) for _ in range(2)]
    views.append(torch.randn(n, 3, LOCAL, LOCAL, generator=g))
    return {"views": views, "label": torch.tensor(LABELS[case]), "index": torch.arange(n)}


def shard(batch: dict[str, Any], rank: int) -> dict[str, Any]:
    rows = slice(PER_RANK * rank, PER_RANK * (rank + 1))
    return {k: [v[rows] for v in val] if isinstance(val, list) else val[rows] for k, val in batch.items()}


def grads_of(module: SSLModule, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        module.training_step(batch, 0).backward()
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def worker(rank: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for case in LABELS:
            grads = grads_of(build(), shard(global_batch(case), rank))
            out[case] = {k: all_reduce_sum(g.clone()) / WORLD for k, g in grads.items()}  # what DDP applies
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp: Path = tmp_path_factory.mktemp("supervised_ddp")
    mp.spawn(worker, args=(str(tmp / "init"), str(tmp / "result")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"result.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(LABELS))
def test_ddp_gradient_is_the_one_process_gradient(ranks: list[dict[str, Any]], case: str) -> None:
    expected = grads_of(build(), global_batch(case))
    head = [k for k in expected if k.startswith("objectives.supervised.")]
    assert head and expected[head[0]].abs().sum() > 0
    for out in ranks:
        assert set(out[case]) == set(expected)  # every parameter got a gradient on both ranks
        for name, grad in expected.items():
            torch.testing.assert_close(out[case][name], grad, **TOL)
