"""Streaming shards: every sample once per epoch across ranks and workers, exact resume mid-epoch.

The shards are written by the test (noise PNGs). "Ranks" are separate data modules with
rank r of world w (their loaders never talk to each other); workers are real DataLoader
processes. Resuming is checked through the data module's own checkpoint hooks: the batches
after a resume equal an uninterrupted run's bit for bit (views, masks, indices).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from shard_samples import shard_config, write_shards

from ssl.data import datamodule
from ssl.data.datamodule import PretrainDataModule
from ssl.data.masking import RandomTokenMasker
from ssl.data.shard_stream import SEED_KEY, STREAM_STATE, StreamPlan, reader_order
from ssl.data.shards import build_webdataset
from ssl.data.spec import ViewSpec
from ssl.errors import IncompatibleConfigError

VIEWS = ViewSpec(global_crops=2, local_crops=1, plain_crops=1)


class FakeTrainer:
    """What the data module's hooks read from Lightning's trainer."""

    def __init__(self, world: int = 1, rank: int = 0) -> None:
        self.world_size, self.global_rank, self.current_epoch = world, rank, 0


def module(cfg: dict, world: int = 1, rank: int = 0, workers: int = 0, batch: int = 4) -> PretrainDataModule:
    node = OmegaConf.create(cfg)
    data = PretrainDataModule(node, VIEWS, batch_size=batch, num_workers=workers,
                              dataset=build_webdataset(node, "pretrain"), seed=7,
                              maskers=[RandomTokenMasker(9, 0.5, prefix="m")])
    data.trainer = FakeTrainer(world, rank)  # type: ignore[assignment]
    return data


def take(data: PretrainDataModule, loader: Any, count: int | None = None) -> list[dict[str, Any]]:
    """Up to `count` batches, each passed through the hook a training step's batch goes through."""
    out = []
    for batch in loader:
        data.on_after_batch_transfer(batch, 0)
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def checkpoint(data: PretrainDataModule, epoch: int, done: int) -> dict[str, Any]:
    """What `state_dict` saves (Lightning's progress counters stood in for)."""
    return {"epoch": epoch, "batches_done": done, "batch_size": data.batch_size, "stream": data.feed.state()}


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["index"], y["index"])
        for key in ("views", "plain_views"):
            assert all(torch.equal(u, v) for u, v in zip(x[key], y[key]))
        assert torch.equal(x["m_mask"], y["m_mask"])


def test_every_sample_once_per_epoch_over_ranks_and_workers(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, count=70, per_shard=5)  # 14 shards
    cfg = shard_config(pattern)
    seen: list[int] = []
    lengths = []
    for rank in range(2):
        data = module(cfg, world=2, rank=rank, workers=2)
        data.setup()
        loader = data.train_dataloader()
        batches = take(data, loader)
        lengths.append(len(batches))
        assert len(batches) == len(loader)
        seen += [i for b in batches for i in b["index"].tolist()]
    plan = data.feed.plan
    assert lengths == [plan.batches] * 2  # equal steps on every rank (DDP)
    assert len(seen) == len(set(seen))  # nothing read twice
    assert len(seen) == 70 - plan.remainder and plan.remainder < 2 * 2 * 4  # under a partial batch per reader
    assert set(seen) <= set(range(70))


def test_plan_is_epoch_independent_and_covers_uneven_shards() -> None:
    sizes = [7, 5, 9, 3, 8, 8, 2, 6, 5]
    plan = StreamPlan(sizes, len(sizes), world=2, workers=2, batch_size=2, seed=0)
    for epoch in range(6):
        for rank in range(2):
            readers = plan.readers(epoch, rank)
            assert sum(r.quota for r in readers) == plan.batches
            for reader in readers:  # no reader owes more batches than its shards hold
                assert reader.quota * 2 <= sum(sizes[s] for s in reader.shards)
        shards = [s for rank in range(2) for r in plan.readers(epoch, rank) for s in r.shards]
        assert sorted(shards) == list(range(len(sizes)))
    assert plan.remainder == sum(sizes) - 2 * plan.batches * 2
    assert reader_order([3, 1, 2]) == [0, 1, 2, 0, 2, 0]
    with pytest.raises(IncompatibleConfigError, match="more \\(smaller\\) shards"):
        StreamPlan([4], 1, world=2, workers=1, batch_size=4, seed=0)


def test_shuffle_buffer_mixes_shards_and_epochs_differ(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, count=40, per_shard=10)
    first = module(shard_config(pattern, shuffle_buffer=0, shuffle_shards=False))
    first.setup()
    in_order = [i for b in take(first, first.train_dataloader()) for i in b["index"].tolist()]
    assert in_order == list(range(40))
    data = module(shard_config(pattern, shuffle_buffer=16))
    data.setup()
    loader = data.train_dataloader()
    epoch0 = [i for b in take(data, loader) for i in b["index"].tolist()]
    data.trainer.current_epoch = 1
    epoch1 = [i for b in take(data, loader) for i in b["index"].tolist()]
    assert sorted(epoch0) == sorted(epoch1) == list(range(40))
    assert epoch0 != epoch1
    assert any(abs(a - b) >= 10 for a, b in zip(epoch0, epoch0[1:]))  # neighbours from other shards


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_is_bit_identical(tmp_path: Path, workers: int) -> None:
    """Killed after 5 batches of epoch 1 (the buffer spans shards, both readers mid-shard)."""
    pattern = write_shards(tmp_path, count=60, per_shard=6, corrupt={13, 40})
    cfg = shard_config(pattern, shuffle_buffer=10)
    whole = module(cfg, workers=workers)
    whole.setup()
    loader = whole.train_dataloader()
    take(whole, loader)
    whole.trainer.current_epoch = 1
    uninterrupted = take(whole, loader)

    killed = module(cfg, workers=workers)
    killed.setup()
    loader = killed.train_dataloader()
    take(killed, loader)
    killed.trainer.current_epoch = 1
    head = take(killed, loader, 5)
    saved = checkpoint(killed, 1, 5)

    resumed = module(cfg, workers=workers)
    resumed.load_state_dict(saved)
    resumed.trainer.current_epoch = 1
    tail = take(resumed, resumed.train_dataloader())
    same_batches(head + tail, uninterrupted)
    # The skipped samples are counted once, in the batch that skipped them.
    skipped = [path for b in uninterrupted for path, _ in b["unreadable"]]
    assert sorted(skipped) == sorted(p for b in head + tail for p, _ in b["unreadable"])
    assert all(STREAM_STATE not in b for b in uninterrupted)


def test_resampled_stream_has_its_epoch_length_and_resumes(tmp_path: Path) -> None:
    pattern = write_shards(tmp_path, count=30, per_shard=5)
    cfg = shard_config(pattern, epoch_samples=48, shuffle_buffer=6)
    whole = module(cfg, workers=0)
    whole.setup()
    uninterrupted = take(whole, whole.train_dataloader())
    assert len(uninterrupted) == 48 // 4
    killed = module(cfg)
    killed.setup()
    head = take(killed, killed.train_dataloader(), 7)
    resumed = module(cfg)
    resumed.load_state_dict(checkpoint(killed, 0, 7))
    same_batches(head + take(resumed, resumed.train_dataloader()), uninterrupted)


def test_other_worker_count_restarts_the_stream_with_the_right_length(tmp_path: Path, capsys) -> None:
    pattern = write_shards(tmp_path, count=48, per_shard=6)
    killed = module(shard_config(pattern), workers=0)
    killed.setup()
    take(killed, killed.train_dataloader(), 3)
    resumed = module(shard_config(pattern), workers=2)
    resumed.load_state_dict(checkpoint(killed, 0, 3))
    loader = resumed.train_dataloader()
    assert len(take(resumed, loader)) == len(loader) - 3
    assert "restarts its shard stream" in capsys.readouterr().err


def test_an_epoch_end_checkpoint_starts_the_next_epoch_afresh(tmp_path: Path, capsys) -> None:
    cfg = shard_config(write_shards(tmp_path, count=24, per_shard=6))
    whole = module(cfg)
    whole.setup()
    loader = whole.train_dataloader()
    take(whole, loader)
    whole.trainer.current_epoch = 1
    saved = checkpoint(whole, 1, 0)  # last.ckpt at the end of epoch 0
    epoch1 = take(whole, loader)
    resumed = module(cfg)
    resumed.load_state_dict(saved)
    resumed.trainer.current_epoch = 1
    same_batches(take(resumed, resumed.train_dataloader()), epoch1)
    assert "warning" not in capsys.readouterr().err


def test_stream_refuses_labelled_batches_and_keeps_the_seed_key(tmp_path: Path) -> None:
    assert SEED_KEY == datamodule.SEED_KEY
    node = OmegaConf.create(shard_config(write_shards(tmp_path, count=10, per_shard=5)))
    with pytest.raises(IncompatibleConfigError, match="labelled_per_batch=null"):
        PretrainDataModule(node, VIEWS, 4, 0, dataset=build_webdataset(node, "pretrain"),
                           labelled_per_batch=2)


class Recorder(pl.LightningModule):
    """Trains a linear layer on the first view; records each step's sample indices and views."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.seen: list[tuple[int, list[int], float]] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        assert STREAM_STATE not in batch
        self.seen.append((self.global_step, batch["index"].tolist(), float(batch["views"][0].sum())))
        return self.layer(batch["views"][0].mean((2, 3))).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path: Path, **kwargs: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=str(tmp_path), **kwargs)


class Killed(Exception):
    """The run dies right after its checkpoint is on disk."""


class SaveAt(pl.Callback):
    """Saves a checkpoint after step `step`, where ModelCheckpoint(every_n_train_steps) would, then stops."""

    def __init__(self, step: int, path: Path) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            raise Killed


def test_lightning_checkpoint_resumes_the_stream(tmp_path: Path) -> None:
    """Through Lightning's own loop (batches fetched ahead, 2 workers): killed after step 7 of
    2 x 10, resumed from its checkpoint: the steps from 7 on see the uninterrupted run's batches."""
    cfg = shard_config(write_shards(tmp_path, count=44, per_shard=4), shuffle_buffer=6)
    whole = Recorder()
    trainer(tmp_path, max_epochs=2).fit(whole, datamodule=module(cfg, workers=2))
    assert len(whole.seen) == 2 * 10  # 44 samples, 2 readers of 22: 5 batches of 4 each
    path = tmp_path / "step7.ckpt"
    first = Recorder()
    with pytest.raises(Killed):
        killed = trainer(tmp_path, max_epochs=2, callbacks=[SaveAt(7, path)])
        killed.fit(first, datamodule=module(cfg, workers=2))
    resumed = Recorder()
    trainer(tmp_path, max_epochs=2).fit(resumed, datamodule=module(cfg, workers=2), ckpt_path=str(path))
    assert first.seen[:7] + resumed.seen == whole.seen
