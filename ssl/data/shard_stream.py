"""Streaming shards to the training loop: split over ranks and workers, shuffled, resumable.

Who reads what. Every (rank, DataLoader worker) pair is one *reader*. In epoch e the shard list
is permuted with (seed, e); rank r takes every world-th shard from r on, and its worker w every
W-th of those. So no shard, hence no sample, is read twice in an epoch.

How long an epoch is. Under DDP every rank must take the same number of steps, and Lightning
asks for it once, so it cannot depend on the epoch's permutation. With sample counts known
(one pass per epoch), L batches per rank is the most that every rank is sure to fill in every
epoch: from the smallest shards a rank could draw, less one partial batch per worker. Each
reader then gets a quota (its full batches, trimmed until its rank's quotas add up to L). The
remainder, total - world x L x batch, is the same every epoch, is printed at the start and
falls on other samples each epoch. With `dataset.epoch_samples=N` the stream is infinite
instead: each reader draws shards with replacement (webdataset's `resampled`), N samples an
epoch, and nothing is promised about repeats.

Shuffling. Each reader keeps a buffer of `dataset.shuffle_buffer` undecoded samples and emits
a random one (numpy PCG64, seeded by seed, epoch, rank, worker) for every sample it reads, as
webdataset's `shuffle` does; at the end of its shards a reader empties the buffer, so a pass
emits each of its samples once. Each sample's augmentations are seeded by its position in its
reader's stream, and the collate step seeds the masks from those seeds.

Exact resume. A batch carries its reader's state after it: the stream position (shard
position, samples into that shard), the keys of the samples in the buffer and the generator's
state. The data module keeps the state of the last batch each reader gave the training step
and saves all ranks' states in the checkpoint. A resumed reader re-reads only the shards its
buffer's samples came from (without decoding; at most buffer / shard size + 1 shards), rebuilds
the buffer and continues. The DataLoader takes batches from its workers in turn, so the resumed
loader numbers its workers from the reader whose batch came next. Given the same shards, seed,
devices, `data.num_workers`, batch size and buffer size, the resumed batches are bit-identical
to an uninterrupted run's (tests/unit/data/test_shard_stream.py). Changing devices, workers,
batch size or the shard count restarts each reader's epoch for the batches it still owes
(with a warning: samples of that epoch then repeat or are missed).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssl.data.datasets import UnreadableImageError
from ssl.data.tar_shards import Sample, ShardReadError
from ssl.errors import IncompatibleConfigError

STREAM_STATE = "_stream_state"  # batch key: (reader, its state after this batch); the data module pops it
SEED_KEY = "_sample_seed"  # as ssl.data.datamodule.SEED_KEY (imported there; kept equal by a test)
Entry = tuple[int, int, str, Sample]  # (position in the reader's shard sequence, ordinal, key, sample)


class ShardSource(Protocol):
    """What the stream needs from a sharded dataset (ShardedImages, streamed Hugging Face sets)."""

    urls: list[str]
    sizes: list[int] | None

    @property
    def num_shards(self) -> int: ...
    def samples(self, shard: int, skip: int = 0) -> Iterator[tuple[int, str, Sample]]: ...
    def decode(self, sample: Sample, where: str) -> tuple[Any, int]: ...
    def index(self, shard: int, ordinal: int) -> int: ...


def is_stream_source(dataset: Any) -> bool:
    """Whether the data module should stream `dataset` (shards) instead of sampling it by index."""
    return callable(getattr(dataset, "samples", None)) and hasattr(dataset, "num_shards")


_MASK = 2**64 - 1


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed of integers (splitmix64 over them): a few times cheaper than SeedSequence,
    which matters once per sample."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & _MASK)) * 0xBF58476D1CE4E5B9 & _MASK
        state = ((state ^ (state >> 31)) + 0x9E3779B97F4A7C15) * 0x94D049BB133111EB & _MASK
        state ^= state >> 29
    return state >> 1


# ------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class ReaderPlan:
    """One reader's epoch: its shards in order (None: drawn with replacement) and its batch quota."""

    shards: tuple[int, ...] | None
    quota: int
    draw_seed: int = 0
    num_shards: int = 0

    def shard_at(self, position: int) -> int:
        """The shard at `position` of this reader's sequence (cycling; past its end only after errors)."""
        if self.shards is None:
            return _seed(self.draw_seed, position) % self.num_shards
        return self.shards[position % len(self.shards)]


def reader_order(quotas: Sequence[int]) -> list[int]:
    """The reader of each batch of an epoch, as a DataLoader takes them from its workers in turn."""
    remaining, order = list(quotas), []
    while any(remaining):
        for worker, left in enumerate(remaining):
            if left:
                order.append(worker)
                remaining[worker] -= 1
    return order


class StreamPlan:
    """The epoch length and every reader's shards and quota, the same on every rank."""

    def __init__(self, sizes: Sequence[int] | None, num_shards: int, world: int, workers: int,
                 batch_size: int, seed: int, shuffle_shards: bool = True,
                 epoch_samples: int | None = None) -> None:
        self.sizes = None if sizes is None else list(sizes)
        self.num_shards, self.world, self.workers = int(num_shards), int(world), max(1, int(workers))
        self.batch_size, self.seed, self.shuffle_shards = int(batch_size), int(seed), bool(shuffle_shards)
        self.epoch_samples = None if epoch_samples is None else int(epoch_samples)
        self.batches = self._epoch_batches()
        total = self.epoch_samples if self.sizes is None or self.resampled else sum(self.sizes)
        self.remainder = 0 if self.resampled else total - self.world * self.batches * self.batch_size

    @property
    def resampled(self) -> bool:
        return self.epoch_samples is not None

    def _rank_shard_counts(self) -> list[int]:
        return [len(range(r, self.num_shards, self.world)) for r in range(self.world)]

    def _epoch_batches(self) -> int:
        if self.resampled:
            batches = self.epoch_samples // (self.world * self.batch_size)
            if batches < 1:
                raise IncompatibleConfigError(
                    f"dataset.epoch_samples={self.epoch_samples} is less than one batch per device "
                    f"({self.world} x data.batch_size={self.batch_size}); raise it."
                )
            return batches
        if self.sizes is None:
            raise IncompatibleConfigError(
                "the shards' sample counts are unknown: set dataset.index (one pass an epoch) or "
                "dataset.epoch_samples=N (shards drawn with replacement)."
            )
        smallest = sorted(self.sizes)
        per_rank = []
        for count in self._rank_shard_counts():
            readers = min(self.workers, count)
            # Each reader's full batches add up to at least this (a partial batch each, at most B - 1):
            # ceil((n - readers * (B - 1)) / B), as the sum of the floors is an integer.
            floor_samples = sum(smallest[:count]) - max(readers - 1, 0) * (self.batch_size - 1)
            per_rank.append(max(0, floor_samples) // self.batch_size)
        batches = min(per_rank)
        if batches < 1:
            raise IncompatibleConfigError(
                f"{self.num_shards} shards of {sum(self.sizes)} samples over {self.world} device(s) x "
                f"{self.workers} worker(s) with data.batch_size={self.batch_size}: some device cannot be "
                "sure of one full batch an epoch. Use more (smaller) shards (scripts/pack_shards.py "
                "--samples-per-shard), fewer data.num_workers or a smaller data.batch_size."
            )
        return batches

    def order(self, epoch: int) -> list[int]:
        """Epoch `epoch`'s shard order (a seeded permutation, or the list as given)."""
        if not self.shuffle_shards:
            return list(range(self.num_shards))
        generator = torch.Generator().manual_seed(_seed(self.seed, epoch, 0x5A4D))
        return torch.randperm(self.num_shards, generator=generator).tolist()

    def readers(self, epoch: int, rank: int) -> list[ReaderPlan]:
        """Rank `rank`'s readers (one per worker) in `epoch`."""
        if self.resampled:
            share, extra = divmod(self.batches, self.workers)
            quotas = [share + (w < extra) for w in range(self.workers)]
            return [ReaderPlan(None, q, _seed(self.seed, epoch, rank, w, 0xD8A3), self.num_shards)
                    for w, q in enumerate(quotas)]
        assert self.sizes is not None
        mine = self.order(epoch)[rank :: self.world]
        shards = [tuple(mine[w :: self.workers]) for w in range(self.workers)]
        quotas = [sum(self.sizes[s] for s in group) // self.batch_size for group in shards]
        for _ in range(sum(quotas) - self.batches):  # trim the fullest readers down to L in all
            quotas[max(range(self.workers), key=lambda w: (quotas[w], -w))] -= 1
        return [ReaderPlan(group, q) for group, q in zip(shards, quotas)]

    def describe(self) -> str:
        if self.resampled:
            return (f"{self.num_shards} shards drawn with replacement, {self.batches} batches of "
                    f"{self.batch_size} per device an epoch")
        total = sum(self.sizes or [])
        share = 100 * self.remainder / max(total, 1)
        return (f"{self.num_shards} shards, {total} samples: {self.batches} batches of {self.batch_size} per "
                f"device an epoch over {self.world} device(s) x {self.workers} reader(s); {self.remainder} "
                f"samples ({share:.2f}%) left out each epoch (other ones each epoch)")


# ---------------------------------------------------------------------------------------- reader


class ShardReader:
    """One reader's stream of undecoded samples through its shuffle buffer, with its exact state."""

    def __init__(self, source: ShardSource, plan: ReaderPlan, buffer_size: int, rng_seed: int) -> None:
        self.source, self.plan, self.buffer_size = source, plan, int(buffer_size)
        self.rng = np.random.Generator(np.random.PCG64(rng_seed))
        self.cursor = (0, 0)
        self.buffer: list[Entry] = []
        self.draining = False  # at the end of a pass over the reader's shards: the buffer empties first
        self.errors: list[tuple[str, str]] = []  # (shard, reason) of shards that broke part-way

    def state(self) -> dict[str, Any]:
        """Plain ints and lists: where to continue, which samples wait in the buffer, the generator."""
        return {"cursor": list(self.cursor), "buffer": [[p, o] for p, o, _, _ in self.buffer],
                "draining": self.draining, "rng": self.rng.bit_generator.state}

    def raw(self, position: int, skip: int) -> Iterator[Entry | int]:
        """Samples from `skip` into the shard at `position` on, shard after shard, without end;
        after the last shard of each pass over the reader's list, the next pass's first position."""
        empty = 0
        while True:
            shard, got = self.plan.shard_at(position), False
            try:
                for ordinal, key, sample in self.source.samples(shard, skip):
                    got = True
                    yield position, ordinal, key, sample
            except ShardReadError as error:
                reason = f"shard unreadable after {error.read} samples ({error.reason})"
                self.errors.append((error.url, reason))
            empty = 0 if got or skip else empty + 1
            if empty > self.source.num_shards:
                raise UnreadableImageError(
                    self.source.urls[shard], f"no readable sample in {empty} shards in a row: check them"
                )
            position, skip = position + 1, 0
            if self.plan.shards is not None and position % len(self.plan.shards) == 0:
                yield position

    def stream(self, state: dict[str, Any] | None = None) -> Iterator[Entry]:
        """The shuffled samples, from the start or from `state` (rebuilding its buffer first).

        As webdataset's shuffle: fill the buffer, then for each sample read emit a random one in
        its place; at the end of a pass over the reader's shards the buffer empties in random
        order before the next pass, so a pass emits each of its samples once.
        """
        if state is None or "cursor" not in state:  # a fresh stream ({"batches": n} only: counted, not read)
            state = None
        else:
            self.rng.bit_generator.state = state["rng"]
            self.draining = bool(state["draining"])
        cursor = tuple(state["cursor"]) if state else (0, 0)
        keys = [tuple(k) for k in state["buffer"]] if state else []
        if keys:
            raw = self.raw(min(p for p, _ in keys), 0)
            found: dict[tuple[int, int], Entry] = {}
            wanted = set(keys)
            for entry in raw:
                here = (entry, 0) if isinstance(entry, int) else (entry[0], entry[1])
                if here <= cursor and isinstance(entry, int):  # a pass end already behind the cursor
                    continue
                if here >= cursor:
                    raw = itertools.chain([entry], raw)
                    break
                if (entry[0], entry[1]) in wanted:
                    found[(entry[0], entry[1])] = entry
            if len(found) != len(wanted):
                raise RuntimeError(
                    f"resuming the stream: {len(wanted) - len(found)} buffered samples are no longer "
                    "in their shards (were the shards rewritten since the checkpoint?)"
                )
            self.buffer = [found[k] for k in keys]
            self.errors.clear()  # reported before the checkpoint
        else:
            raw = self.raw(*cursor)
        self.cursor = cursor
        while True:
            while self.draining and self.buffer:
                slot = int(self.rng.integers(len(self.buffer)))
                self.buffer[slot], self.buffer[-1] = self.buffer[-1], self.buffer[slot]
                yield self.buffer.pop()
            self.draining = False
            entry = next(raw)
            if isinstance(entry, int):  # a pass is over
                self.cursor = (entry, 0)
                self.draining = self.buffer_size > 1
                continue
            self.cursor = (entry[0], entry[1] + 1)
            if self.buffer_size <= 1:
                yield entry
                continue
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(entry)
                continue
            slot = int(self.rng.integers(len(self.buffer)))
            out, self.buffer[slot] = self.buffer[slot], entry
            yield out

# ---------------------------------------------------------------------------------------- stream


class ShardStream(IterableDataset):
    """Batches (lists of transformed samples) of this rank's readers; one reader per worker.

    Each item is `{"samples": [...], "reader": w, "state": ...}`; `StreamCollate` turns it into
    the batch. `epoch`, `resume` ({reader: state}) and `batches_done` are set by the loader
    before each pass (see `StreamLoader`).
    """

    def __init__(self, source: ShardSource, plan: StreamPlan, rank: int, transform: Callable,
                 buffer_size: int, seed: int) -> None:
        self.source, self.plan, self.rank = source, plan, int(rank)
        self.transform, self.buffer_size, self.seed = transform, int(buffer_size), int(seed)
        self.epoch, self.batches_done = 0, 0
        self.resume: dict[int, dict[str, Any]] = {}

    def __len__(self) -> int:
        return self.plan.batches

    def first_reader(self) -> int:
        """The reader whose batch comes next after `batches_done`: worker 0 of this pass reads for it."""
        order = reader_order([r.quota for r in self.plan.readers(self.epoch, self.rank)])
        return order[self.batches_done] if self.batches_done < len(order) else 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        workers = self.plan.workers
        reader_id = (self.first_reader() + physical) % workers
        plan = self.plan.readers(self.epoch, self.rank)[reader_id]
        state = self.resume.get(reader_id)
        done = int(state["batches"]) if state else 0
        if done >= plan.quota:
            return
        reader = ShardReader(self.source, plan, self.buffer_size,
                             _seed(self.seed, self.epoch, self.rank, reader_id, 0xB0FF))
        samples: list[dict[str, Any]] = []
        unreadable: list[tuple[str, str]] = []
        for position, ordinal, key, raw in reader.stream(state):
            shard = plan.shard_at(position)
            try:
                image, label = self.source.decode(raw, f"{self.source.urls[shard]}:{key}")
            except UnreadableImageError as error:
                unreadable.append((error.path, error.reason))
                continue
            seed = _seed(self.seed, self.epoch, self.rank, reader_id, position, ordinal)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                views = self.transform(image)
            samples.append({**views, "label": label, "index": self.source.index(shard, ordinal),
                            "unreadable": [], SEED_KEY: seed})
            if len(samples) == self.plan.batch_size:
                done += 1
                samples[0]["unreadable"] = unreadable + reader.errors
                unreadable, reader.errors = [], []
                yield {"samples": samples, "reader": reader_id, "state": {**reader.state(), "batches": done}}
                samples = []
                if done >= plan.quota:
                    return


class StreamCollate:
    """The data module's collate step over an item's samples, plus the reader's state."""

    def __init__(self, collate: Callable[[list[dict[str, Any]]], dict[str, Any]]) -> None:
        self.collate = collate

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        batch = self.collate(item["samples"])
        batch[STREAM_STATE] = {"reader": item["reader"], "state": item["state"]}
        return batch


class StreamLoader(DataLoader):
    """A DataLoader over a ShardStream that asks `before_pass` for the epoch and resume point first.

    Workers are started anew each pass (no persistent workers), so each gets the stream as set.
    """

    def __init__(self, stream: ShardStream, before_pass: Callable[[ShardStream], None],
                 **kwargs: Any) -> None:
        super().__init__(stream, batch_size=None, persistent_workers=False, **kwargs)
        self.before_pass = before_pass

    def __iter__(self):  # type: ignore[override]
        self.before_pass(self.dataset)  # type: ignore[arg-type]
        return super().__iter__()


def resume_states(saved: dict[str, Any], plan: StreamPlan, rank: int, epoch: int,
                  batches_done: int) -> dict[int, dict[str, Any]]:
    """This rank's reader states from a checkpoint's stream entry. When the saved split does not
    match this run's (other devices, workers, batch size or shards), each reader starts afresh
    with the batches it owes for the rest of the epoch (a warning says the samples differ)."""
    if batches_done == 0:  # saved at an epoch's end: the next epoch starts its stream afresh
        return {}
    order = reader_order([r.quota for r in plan.readers(epoch, rank)])
    expected = {w: order[:batches_done].count(w) for w in set(order[:batches_done])}
    counted_only = {w: {"batches": n} for w, n in expected.items()}
    layout = {"world": plan.world, "workers": plan.workers, "batch_size": plan.batch_size,
              "num_shards": plan.num_shards}
    if {k: saved.get(k) for k in layout} != layout:
        was = {k: saved.get(k) for k in layout}
        print(f"warning: the checkpoint's stream was split as {was}, this run's as {layout}: epoch "
              f"{epoch} restarts its shard stream for its remaining batches "
              "(the samples differ from an uninterrupted run's).", file=sys.stderr)
        return counted_only
    states = {int(k): v for k, v in saved["readers"][rank].items()}
    if {w: int(s["batches"]) for w, s in states.items()} != expected:
        print(f"warning: the checkpoint's reader positions {sorted(states)} do not match {batches_done} "
              "batches done; the stream restarts the epoch.", file=sys.stderr)
        return counted_only
    return states
