"""data2vec 2.0 under 2-process CPU DDP (gloo) against one process on the same global batch.

The same seeded ViT + objective (through SSLModule: the real teacher and fixed sin-cos init) in 2
gloo processes and here, on 4 images with 2 inverse block masks each; rank r takes images
[2r, 2r + 2) and their mask rows [4r, 4r + 4). Decoder noise is off (std 0): its draws come from
each process's global RNG, so only the noise-free computation can match across process counts.

Every row masks the same number of tokens, so the regression term (a mean over masked tokens) is
the global mean under DDP. The CLS term is, as in fairseq, cls_loss x the *sum* over the device's
clones (the criterion multiplies it by the local sample size before the global division): DDP's
update is therefore one process's gradient on the global batch with cls_loss / world size, and
measurably not the gradient with the same cls_loss. Both are asserted.
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
from ssl.objectives.data2vec2 import Data2Vec2

pytestmark = pytest.mark.distributed

WORLD, IMAGES, CLONES, IMAGE = 2, 4, 2, 16
TOL = {"rtol": 1e-5, "atol": 1e-6}


def build(cls_loss: float = 0.01) -> SSLModule:
    torch.manual_seed(0)
    backbone = build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": IMAGE, "patch_size": 2, "drop_path_rate": 0.0,
        "kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}))
    objective = Data2Vec2(backbone, **recipe_settings(
        "data2vec2", image_size=IMAGE, clone_batch=CLONES, mask_noise_std=0.0, cls_loss=cls_loss,
        decoder={"layers": 2},
    ))
    return SSLModule(backbone, {"data2vec2": objective}, {"data2vec2": 1.0}, None, batch_size=2)


def global_batch() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    batch: dict[str, Any] = {"index": torch.arange(IMAGES),
                             "plain_views": [torch.randn(IMAGES, 3, IMAGE, IMAGE, generator=g)]}
    for masker in build().objectives["data2vec2"].batch_maskers():
        batch.update(masker(IMAGES, g))
    return batch


def shard(batch: dict[str, Any], rank: int) -> dict[str, Any]:
    """Images [2r, 2r + 2) and their clones' mask rows, as a DistributedSampler + collate give."""
    per_rank = IMAGES // WORLD
    out: dict[str, Any] = {}
    for key, value in batch.items():
        if isinstance(value, list):
            out[key] = [v[rank * per_rank : (rank + 1) * per_rank] for v in value]
        elif key.startswith("data2vec2_"):
            out[key] = value[rank * per_rank * CLONES : (rank + 1) * per_rank * CLONES]
        else:
            out[key] = value[rank * per_rank : (rank + 1) * per_rank]
    return out


def loss_and_grads(module: SSLModule, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def worker(rank: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        loss, grads = loss_and_grads(build(), shard(global_batch(), rank))
        ddp = {k: all_reduce_sum(g.clone()) / WORLD for k, g in grads.items()}  # what DDP applies
        torch.save({"loss": loss, "ddp_grads": ddp}, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_ddp_update_is_the_global_gradient_with_the_per_device_cls_sum(tmp_path: Path) -> None:
    results = str(tmp_path / "result")
    mp.spawn(worker, args=(str(tmp_path / "init"), results), nprocs=WORLD, join=True)
    ranks = [torch.load(f"{results}.{r}", weights_only=True) for r in range(WORLD)]
    full = global_batch()
    masked = full["data2vec2_mask"].sum(1)
    assert (masked == masked[0]).all() and masked[0] == 52  # every row: int(64 * 0.2) = 12 visible

    # One process, cls_loss / world: the update DDP applies (the CLS sum halves with the batch).
    _, expected = loss_and_grads(build(cls_loss=0.01 / WORLD), full)
    ddp_loss = sum(r["loss"] for r in ranks) / WORLD
    for name, grad in expected.items():
        for r in ranks:
            torch.testing.assert_close(r["ddp_grads"][name], grad, **TOL)
    torch.testing.assert_close(ddp_loss, loss_and_grads(build(cls_loss=0.01 / WORLD), full)[0], **TOL)
    assert set(ranks[0]["ddp_grads"]) == set(expected)

    # The same cls_loss in one process on the global batch weighs the CLS term twice as much.
    _, same_weight = loss_and_grads(build(), full)
    flat = torch.cat([same_weight[k].flatten() for k in sorted(expected)])
    ddp_flat = torch.cat([ranks[0]["ddp_grads"][k].flatten() for k in sorted(expected)])
    assert (flat - ddp_flat).norm() > 1e-4 * flat.norm()
