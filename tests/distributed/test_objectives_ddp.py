"""Every objective under 2-process CPU DDP (gloo) against one process on the same global batch.

Part 1 runs each objective without Lightning: the same seeded ViT + objective (built through
SSLModule, so the teacher and MAE's encoder init are the real ones) in 2 gloo processes and in
this process, on one fixed global batch of 4 images whose masks come from the objective's own
`batch_maskers()`; rank r takes rows [2r, 2r + 2). It checks the loss, the gradients DDP would
apply (the all-reduced mean of the per-rank gradients) and the objective state after the step.

Part 2 runs Lightning DDP on 2 CPU processes: train, checkpoint, resume in fresh processes.

A ViT (LayerNorm) backbone keeps every sample's computation independent of the others, so any
mismatch is a cross-rank bug rather than BatchNorm batch statistics (see `build` for CoKe's
BatchNorm heads).
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from synthetic import NoiseImages

from ssl.backbones.factory import build_backbone
from ssl.backbones.vit import ViTBackbone
from ssl.data.datamodule import PretrainDataModule
from ssl.distributed import all_reduce_sum
from ssl.module import SSLModule
from ssl.objectives import recipe_settings
from ssl.objectives.base import Objective
from ssl.objectives.coke import CoKe
from ssl.objectives.data2vec import Data2Vec
from ssl.objectives.dino import DINO
from ssl.objectives.mae import MAE
from ssl.objectives.mfm import MFM

pytestmark = pytest.mark.distributed

WORLD = 2
GLOBAL_BATCH = 4
IMAGE, LOCAL = 16, 8
NUM_SAMPLES = 8  # CoKe's label memory rows
TOL = {"rtol": 1e-5, "atol": 1e-5}
REPO_ROOT = Path(__file__).resolve().parents[2]


def vit(depth: int = 2) -> ViTBackbone:
    """Patch 2: an 8 x 8 grid, where BEiT block masks can cover different counts per image (on
    4 x 4 they always hit the target exactly). No stochastic depth: its draws differ per batch."""
    return build_backbone(OmegaConf.create({
        "name": "vit_tiny_patch16_224", "img_size": IMAGE, "patch_size": 2, "drop_path_rate": 0.0,
        "kwargs": {"depth": depth, "embed_dim": 32, "num_heads": 2}}))


def tiny_dino(backbone: ViTBackbone) -> DINO:
    return DINO(backbone.embed_dim, **recipe_settings(
        "dino", out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops=2,
    ))


OBJECTIVES: dict[str, Callable[[ViTBackbone], Objective]] = {
    "dino": tiny_dino,
    "mae": lambda b: MAE(b, **recipe_settings(
        "mae", image_size=IMAGE, decoder_dim=32, decoder_depth=1, decoder_heads=2,
    )),
    "mfm": lambda b: MFM(b, **recipe_settings("mfm", image_size=IMAGE, mean=[0.5] * 3, std=[0.25] * 3)),
    "data2vec": lambda b: Data2Vec(b, **recipe_settings("data2vec", image_size=IMAGE, top_k=2)),
    "coke_single": lambda b: CoKe(b.embed_dim, **recipe_settings(
        "coke", num_samples=NUM_SAMPLES, num_clusters=[3, 4], out_dim=16, hidden_dim=32,
    )),
    "coke_two": lambda b: CoKe(b.embed_dim, **recipe_settings(
        "coke", num_samples=NUM_SAMPLES, num_clusters=[3, 4], variant="two", out_dim=16, hidden_dim=32,
    )),
}
# Batch seeds; MFM's and data2vec's give the two ranks different numbers of masked elements.
SEEDS = {"mfm": 4, "data2vec": 7}
# Losses averaged over masked elements, whose count differs between ranks.
MASKED_MEAN = {"mfm", "data2vec"}


def build(case: str) -> SSLModule:
    """The same seeded module in every process.

    CoKe's projection and predictor carry BatchNorm; without SyncBatchNorm (GPU-only: it raises on CPU)
    each rank normalises by its own 2 rows, so nothing could match the 4-row batch. Its heads
    run in eval mode (running statistics, identical everywhere) in both settings; what is
    compared is then the cross-rank part: the all-gathered clustering and its targets.
    """
    torch.manual_seed(0)
    backbone = vit()
    name = case.split("_")[0]
    module = SSLModule(backbone, {name: OBJECTIVES[case](backbone)}, {name: 1.0}, None, batch_size=2)
    if name == "coke":
        module.objectives["coke"].head.eval()
    return module


def global_batch(case: str) -> dict[str, Any]:
    """Views, `index` and the objective's own masks for the whole global batch, from one generator."""
    objective = build(case).objectives[case.split("_")[0]]
    g = torch.Generator().manual_seed(SEEDS.get(case, 0))

    def images(size: int) -> torch.Tensor:
        return (torch.rand(GLOBAL_BATCH, 3, size, size, generator=g) - 0.5) / 0.25

    spec = objective.view_spec()
    batch: dict[str, Any] = {"index": torch.randperm(NUM_SAMPLES, generator=g)[:GLOBAL_BATCH]}
    if spec.global_crops:
        batch["views"] = [images(IMAGE) for _ in range(spec.global_crops)]
        batch["views"] += [images(LOCAL) for _ in range(spec.local_crops)]
    if spec.plain_crops:
        batch["plain_views"] = [images(IMAGE) for _ in range(spec.plain_crops)]
    for masker in objective.batch_maskers():
        batch.update(masker(GLOBAL_BATCH, g))
    return batch


def shard(batch: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rows [2r, 2r + 2) of every tensor: what a DistributedSampler gives rank r."""
    rows = slice(2 * rank, 2 * rank + 2)
    return {k: [v[rows] for v in val] if isinstance(val, list) else val[rows] for k, val in batch.items()}


def normaliser(case: str, batch: dict[str, Any]) -> float:
    """What rank r's loss divides by (up to a constant factor): removed frequencies (MFM), masked
    patches (data2vec, MAE), else images (DINO, CoKe: per-image means)."""
    if case == "mfm":
        return float((1 - batch["mfm_keep"]).sum())
    if case == "data2vec":
        return float(batch["data2vec_mask"].sum())
    if case == "mae":
        return float(batch["mae_mask"].sum())
    return float(len(batch["index"]))


def loss_and_grads(module: SSLModule, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SSLModule.training_step (without a Trainer its self.log only warns), then backward."""
    module.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def objective_state(module: SSLModule) -> dict[str, torch.Tensor]:
    """The objectives' buffers after the step (DINO's centre, CoKe's clustering)."""
    return {k: v.detach().clone() for k, v in module.objectives.named_buffers()}


def objectives_worker(rank: int, init_file: str, results: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for case in OBJECTIVES:
            module = build(case)
            batch = shard(global_batch(case), rank)
            loss, grads = loss_and_grads(module, batch)
            ddp = {k: all_reduce_sum(g.clone()) / WORLD for k, g in grads.items()}  # what DDP applies
            out[case] = {"loss": loss, "count": normaliser(case, batch), "grads": grads, "ddp_grads": ddp,
                         "state": objective_state(module)}
        torch.save(out, f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("objectives_ddp")
    results = str(tmp / "result")
    mp.spawn(objectives_worker, args=(str(tmp / "init"), results), nprocs=WORLD, join=True)
    return [torch.load(f"{results}.{r}", weights_only=True) for r in range(WORLD)]


def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([grads[k].flatten() for k in sorted(grads)])


def trainable(module: SSLModule) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("case", list(OBJECTIVES))
def test_objective_matches_one_process_on_the_global_batch(ranks: list[dict[str, Any]], case: str) -> None:
    """Shards are exact pieces of the global computation; DDP's update is the global one where
    every rank's loss divides by the same count.

    Every loss here is sum(per-element terms) / n_r on rank r. The global loss is therefore the
    n_r-weighted mean of the rank losses, and its gradient the n_r-weighted sum of the rank
    gradients; that is asserted for every objective, and it exercises the cross-rank pieces
    (CoKe's targets from the all-gathered clustering). DDP instead applies the *plain* mean of the
    rank gradients. That is the global gradient when all n_r are equal: DINO and CoKe average
    over images, MAE over a fixed number of removed patches per image. MFM (removed frequencies:
    low-pass and high-pass masks remove different counts) and data2vec (BEiT block masks cover
    a varying number of patches) average over masked elements, so under DDP each rank's
    elements weigh 1 / (R n_r), not 1 / sum(n_r): DDP optimises the mean of per-rank losses,
    which is asserted, and it differs from the one-process gradient (as in the official
    MFM and BEiT/data2vec code, which normalise per GPU too).
    """
    single = build(case)
    full = global_batch(case)
    loss, grads = loss_and_grads(single, full)
    outs = [r[case] for r in ranks]
    counts = [o["count"] for o in outs]
    weights = [c / sum(counts) for c in counts]

    # No parameter is left without a gradient on any rank (DDP without find_unused_parameters
    # would fail), and the gradient sets agree with one process.
    assert set(grads) == trainable(single)
    assert all(set(o["grads"]) == set(grads) for o in outs)
    torch.testing.assert_close(sum(w * o["loss"] for w, o in zip(weights, outs)), loss, **TOL)
    for name, grad in grads.items():
        torch.testing.assert_close(sum(w * o["grads"][name] for w, o in zip(weights, outs)), grad, **TOL)

    ddp_loss = sum(o["loss"] for o in outs) / WORLD
    if case in MASKED_MEAN:
        assert counts[0] != counts[1]  # the batch really exercises unequal counts
        halves = [loss_and_grads(build(case), shard(full, r)) for r in range(WORLD)]
        torch.testing.assert_close(ddp_loss, sum(h[0] for h in halves) / WORLD, **TOL)
        for name in grads:
            expected = sum(h[1][name] for h in halves) / WORLD
            for out in outs:
                torch.testing.assert_close(out["ddp_grads"][name], expected, **TOL)
        # The finding, pinned: DDP's update is measurably not the one-process gradient (MFM with
        # 10 vs 256 removed frequencies: ~6x its norm apart; data2vec with 78 vs 77 masked patches: ~0.2%).
        ddp_flat, single_flat = flat(outs[0]["ddp_grads"]), flat(grads)
        assert (ddp_flat - single_flat).norm() > 1e-4 * single_flat.norm()
    else:
        assert counts[0] == counts[1]
        torch.testing.assert_close(ddp_loss, loss, **TOL)
        for name, grad in grads.items():
            for out in outs:
                torch.testing.assert_close(out["ddp_grads"][name], grad, **TOL)

    # Objective state after the step: DINO's centre from all-reduced teacher logits, CoKe's
    # centres / duals / counters / label memory from the all-gathered batch.
    expected_state = objective_state(single)
    for out in outs:
        assert set(out["state"]) == set(expected_state)
        for key, value in expected_state.items():
            torch.testing.assert_close(out["state"][key], value, **TOL)
    if case == "dino":
        assert expected_state["dino.center"].abs().sum() > 0  # the centre did move


# ------------------------------------------------------------------ Lightning checkpoint / resume
DATASET = OmegaConf.create({
    "name": "synthetic", "image_size": IMAGE, "local_crop_size": LOCAL, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5] * 3, "std": [0.25] * 3,
})




class Probe(pl.Callback):
    """Step, module state and optimizer state at the start and the end of training."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}

    @staticmethod
    def snapshot(trainer: pl.Trainer, module: pl.LightningModule) -> dict[str, Any]:
        return {
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()["state"]),
        }

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.records["start"] = self.snapshot(trainer, module)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.records["end"] = self.snapshot(trainer, module)


def lightning_worker(rank: int, port: int, tmp: str, phase: int) -> None:
    """Phase 0 trains epoch 0 (2 steps) and checkpoints it; phase 1 resumes for epoch 1 (2 more).

    Every process builds its module from its own seed, so equal states can only come from DDP's
    broadcast (phase 0) and the checkpoint (phase 1).
    """
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD), GROUP_RANK="0",
                      TORCHELASTIC_RUN_ID="resume")
    torch.set_num_threads(1)
    torch.manual_seed(100 * phase + rank)
    backbone = vit(depth=1)
    objective = tiny_dino(backbone)
    optim = OmegaConf.load(REPO_ROOT / "conf" / "optimizer" / "dino.yaml")
    module = SSLModule(backbone, {"dino": objective}, {"dino": 1.0}, optim, batch_size=4)
    data = PretrainDataModule(DATASET, objective.view_spec(), 4, 0, dataset=NoiseImages(16))
    probe = Probe()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=f"{tmp}/checkpoints{phase}", save_last=True,
                                              save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy="ddp", max_epochs=phase + 1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp,
                         callbacks=[checkpoint, probe])
    resume = f"{tmp}/checkpoints0/last.ckpt" if phase else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    torch.save(probe.records, f"{tmp}/probe{phase}.{rank}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_states_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


def test_checkpoint_save_and_resume_under_ddp(tmp_path: Path) -> None:
    """A 2-process run saves after 2 steps; a fresh 2-process run resumes at step 2 with the
    saved weights, teacher, DINO centre and AdamW moments on both ranks, and ends at step 4."""
    tmp = str(tmp_path)
    for phase in range(2):
        mp.spawn(lightning_worker, args=(free_port(), tmp, phase), nprocs=WORLD, join=True)
    saved = torch.load(tmp_path / "checkpoints0" / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == 2 and saved["epoch"] == 0
    state = saved["state_dict"]
    assert "objectives.dino.center" in state and any(k.startswith("teacher.module.") for k in state)
    assert state["objectives.dino.center"].abs().sum() > 0
    first = [torch.load(f"{tmp}/probe0.{r}", weights_only=True) for r in range(WORLD)]
    resumed = [torch.load(f"{tmp}/probe1.{r}", weights_only=True) for r in range(WORLD)]
    for rank in range(WORLD):
        assert first[rank]["end"]["step"] == 2
        assert_states_equal(first[rank]["end"]["state"], state)  # what rank 0 saved, every rank held
        start, end = resumed[rank]["start"], resumed[rank]["end"]
        assert (start["step"], start["epoch"]) == (2, 1)
        assert_states_equal(start["state"], state)
        saved_moments = saved["optimizer_states"][0]["state"]
        assert set(start["optimizer"]) == set(saved_moments)
        for index, moments in saved_moments.items():
            for key, value in moments.items():
                assert torch.equal(start["optimizer"][index][key], value), (index, key)
        assert end["step"] == 4
        assert not torch.equal(end["state"]["objectives.dino.center"], state["objectives.dino.center"])
    assert_states_equal(resumed[1]["end"]["state"], resumed[0]["end"]["state"])
