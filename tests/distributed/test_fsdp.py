"""`trainer.strategy=fsdp` (FSDP2 blocks through Lightning's ModelParallelStrategy) equals DDP.

Part 1, without Lightning, for every objective: two gloo processes each hold the same seeded
module twice, once with its ViT blocks sharded (student and teacher) and once plain. Both take one
training step on the rank's half of a global batch; the plain copy gets DDP's update (all-reduced
mean of the gradients). Gradients, clipped gradients, and weights, teacher and objective state
after AdamW + EMA must agree, so the sharded step is the DDP step.

Part 2 runs `python -m ssl.pretrain ... trainer.strategy=fsdp trainer.devices=2` on CPU, the same
with `ddp`, compares their checkpoints, resumes the FSDP run and checks the exported backbone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_objectives_ddp import OBJECTIVES, WORLD, build, global_batch, shard

from ssl.distributed import all_reduce_sum
from ssl.module import SSLModule
from ssl.optim.clipping import clip_gradients
from ssl.sharding import full_state_dict, is_sharded

pytestmark = pytest.mark.distributed
TOL = {"rtol": 1e-5, "atol": 1e-6}


def with_optimizer(module: SSLModule) -> torch.optim.Optimizer:
    module.optim_cfg = OmegaConf.load(REPO_ROOT / "conf" / "optimizer" / "dino.yaml")
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
        if group.get("apply_weight_decay"):
            group["weight_decay"] = 0.04
    return optimizer


def full_grads(module: SSLModule) -> dict[str, torch.Tensor]:
    return {
        name: (p.grad.full_tensor() if is_sharded(p.grad) else p.grad).detach().clone()
        for name, p in module.named_parameters() if p.grad is not None
    }


def step(module: SSLModule, optimizer: torch.optim.Optimizer, batch: dict[str, Any], ddp: bool) -> dict:
    """Forward, backward, DDP's mean (plain copy), the module's own pre-step hook, AdamW, EMA."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = module.training_step(batch, 0)
    loss.backward()
    if ddp:
        for p in module.parameters():
            if p.grad is not None:
                p.grad.copy_(all_reduce_sum(p.grad.clone()) / WORLD)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if module.sharded:
        from ssl.sharding import average_replicated_gradients

        average_replicated_gradients(params)
    reduced = full_grads(module)
    clip_gradients(params, 0.05, "per_parameter")  # small: every gradient here is clipped
    clipped = full_grads(module)
    optimizer.step()
    if module.teacher is not None:
        module.teacher.update(module.mirrored_by_teacher(), 0.9)
    return {"loss": loss.detach(), "grads": reduced, "clipped": clipped, "state": full_state_dict(module)}


def worker(rank: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (WORLD, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    try:
        out = {}
        for case in OBJECTIVES:
            batch = shard(global_batch(case), rank)
            plain = build(case)
            torch.manual_seed(1000 + rank)  # rank 1's own init: only the broadcast can make it equal
            sharded = build(case) if rank == 0 else _reseeded(case)
            sharded._device_mesh = mesh
            sharded.configure_model()
            n_sharded = sum(is_sharded(p) for p in sharded.parameters())
            out[case] = {
                "plain": step(plain, with_optimizer(plain), batch, ddp=True),
                "sharded": step(sharded, with_optimizer(sharded), batch, ddp=False),
                "n_sharded": n_sharded,
            }
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def _reseeded(case: str) -> SSLModule:
    """`build(case)` with different initial weights (build seeds 0; perturb afterwards)."""
    module = build(case)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return module


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    results = str(tmp / "result")
    mp.spawn(worker, args=(str(tmp / "init"), results), nprocs=WORLD, join=True)
    return [torch.load(f"{results}.{r}", weights_only=True) for r in range(WORLD)]


@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_sharded_step_equals_the_ddp_step(ranks: list[dict[str, Any]], case: str) -> None:
    for rank in ranks:
        out = rank[case]
        assert out["n_sharded"] > 0  # the blocks really are sharded
        plain, sharded = out["plain"], out["sharded"]
        torch.testing.assert_close(sharded["loss"], plain["loss"], **TOL)
        for key in ("grads", "clipped", "state"):
            assert set(sharded[key]) == set(plain[key]), key
            for name, value in plain[key].items():
                torch.testing.assert_close(sharded[key][name], value, **TOL, msg=f"{key} {name}")
    # Both ranks end with the same full weights.
    for name, value in ranks[0][case]["sharded"]["state"].items():
        torch.testing.assert_close(ranks[1][case]["sharded"]["state"][name], value, **TOL)


# ------------------------------------------------------------------ end to end through ssl.pretrain
SMALL = [
    "experiment=quickstart", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.limit_train_batches=3",
    "data.batch_size=8", "data.num_workers=0", "knn.max_train_samples=400", "knn.max_test_samples=201",
    "knn.batch_size=50",
    "trainer.enable_progress_bar=false", "objective.dino.out_dim=256", "backbone.kwargs.depth=2",
]


def start_pretrain(run_dir: Path, *overrides: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ssl.pretrain", *SMALL, *overrides, f"hydra.run.dir={run_dir}"],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def finished(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def pretrain(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return finished(start_pretrain(run_dir, *overrides))


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="needs dataset-fashion-mnist")
def test_fsdp_pretrain_matches_ddp_resumes_and_exports(tmp_path: Path) -> None:
    """2 epochs x 3 steps with FSDP and with DDP give the same weights; FSDP resumes for a third.

    The k-NN test shards (101 and 100 images in batches of 50) give the ranks 3 and 2 batches: the
    short rank runs one extra forward, or the sharded blocks' gathers would wait for ever.
    """
    # side by side: most of each short run is the interpreter start-up
    runs = [start_pretrain(tmp_path / strategy, f"trainer.strategy={strategy}", "trainer.max_epochs=2")
            for strategy in ("fsdp", "ddp")]
    fsdp, _ = (finished(proc) for proc in runs)
    assert "k-NN (k=20" in fsdp.stdout
    ckpt = {s: torch.load(tmp_path / s / "checkpoints" / "last.ckpt", weights_only=True)
            for s in ("fsdp", "ddp")}
    assert ckpt["fsdp"]["global_step"] == ckpt["ddp"]["global_step"] == 6
    state = ckpt["fsdp"]["state_dict"]
    assert set(state) == set(ckpt["ddp"]["state_dict"])
    for name, value in ckpt["ddp"]["state_dict"].items():
        if "running_" in name or "num_batches_tracked" in name:
            continue  # DDP re-broadcasts rank 0's BatchNorm statistics every step; FSDP keeps each rank's
        torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=name)

    exported = load_file(str(tmp_path / "fsdp" / "backbone.safetensors"))
    for name, value in exported.items():
        assert torch.equal(value, state[f"teacher.module.backbone.model.{name}"]), name

    resumed = tmp_path / "fsdp_resumed"
    pretrain(resumed, "trainer.strategy=fsdp", "trainer.max_epochs=3",
             f"resume={tmp_path / 'fsdp' / 'checkpoints' / 'last.ckpt'}")
    after = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert after["global_step"] == 9
    qkv = "backbone.model.blocks.0.attn.qkv.weight"
    assert (after["state_dict"][qkv] - state[qkv]).abs().max() > 0
