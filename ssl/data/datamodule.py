"""Lightning data module: multi-crop views for pretraining, clean images for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ssl.data.datasets import UnreadableImageError, build_dataset, next_readable
from ssl.data.device_crops import CROP_ON, SOURCE, check_one_size
from ssl.data.eval_transform import eval_transform
from ssl.data.labelled_split import dataset_labels
from ssl.data.mixed_batch_sampler import MixedBatchSampler
from ssl.data.multicrop import MultiCropTransform
from ssl.data.plain_crop import PlainCropTransform
from ssl.data.pretrain_views import AUGMENT_ON, PretrainViews
from ssl.data.resumable_sampler import ResumableSampler
from ssl.data.shard_stream import is_stream_source
from ssl.data.spec import INDEX, BatchMasker, ViewSpec
from ssl.data.stream_feed import StreamFeed
from ssl.data.worker_signals import ignore_interrupt
from ssl.errors import IncompatibleConfigError

SEED_KEY = "_sample_seed"  # travels from a seeded sample to the collate step, never into the batch


class TransformedDataset(Dataset):
    """Applies `transform` to a (PIL image, label) dataset and returns dicts with the index.

    key="image" for evaluation; key=None when the transform itself returns a dict of views
    (VIEWS, PLAIN_VIEWS). The per-sample index lets objectives keep per-instance state
    (CoKe's label memory).

    An unreadable file (`UnreadableImageError`) never raises here, so never kills a DataLoader
    worker. Every sample carries `"unreadable": [(path, reason)]` (empty when the file was fine),
    which the collate functions move into the batch, so the count reaches the main process.
    on_unreadable="substitute" (pretraining): the next readable image (index + 1, ...) takes the
    slot, with its own index and label, so every batch keeps its size (BatchNorm, DDP gathers and
    CoKe's per-batch assignment want equal, non-empty batches). on_unreadable="drop" (evaluation):
    the sample is a marker without "index" that `collate_readable` leaves out, so features and
    labels are never duplicated and stay aligned. Only the file the sampler asked for is reported,
    so each broken file counts once per epoch however many neighbours were tried.

    An `(index, seed)` pair (from ResumableSampler) runs the transform under a private torch RNG
    seeded with `seed`, and the sample carries the seed for the collate step's masks: the
    augmentations then depend on (seed, epoch, index) only, not on the worker or the process's RNG.
    """

    def __init__(
        self, dataset: Dataset, transform: Callable, key: str | None, on_unreadable: str = "substitute"
    ) -> None:
        if on_unreadable not in ("substitute", "drop"):
            raise ValueError(f"on_unreadable must be 'substitute' or 'drop', got {on_unreadable!r}")
        self.dataset = dataset
        self.transform = transform
        self.key = key
        self.on_unreadable = on_unreadable

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        if isinstance(index, tuple):
            index, seed = index
            with torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also seed every CUDA device,
                # ~60 us per sample that the CPU-side augmentations never use.
                torch.default_generator.manual_seed(seed)
                sample = self.load(index)
            return {**sample, SEED_KEY: seed}
        return self.load(index)

    def load(self, index: int) -> dict[str, Any]:
        unreadable: list[tuple[str, str]] = []
        try:
            image, label = self.dataset[index]
        except UnreadableImageError as error:
            unreadable.append((error.path, error.reason))
            if self.on_unreadable == "drop":
                return {"unreadable": unreadable}
            index, (image, label) = next_readable(self.dataset, index + 1)
        views = self.transform(image)
        sample = dict(views) if self.key is None else {self.key: views}
        return {**sample, "label": label, "index": index, "unreadable": unreadable}


def split_unreadable(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """(the readable samples without their "unreadable" entry, every (path, reason) reported)."""
    unreadable = [entry for sample in samples for entry in sample.get("unreadable", ())]
    kept = [{k: v for k, v in sample.items() if k != "unreadable"} for sample in samples if "index" in sample]
    return kept, unreadable


def collate_readable(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """`default_collate` of the readable samples, plus batch["unreadable"]: the skipped files.

    A batch in which nothing was readable is {"index": empty, "unreadable": [...]}; `CleanLoader`
    leaves it out.
    """
    kept, unreadable = split_unreadable(samples)
    batch = default_collate(kept) if kept else {"index": torch.empty(0, dtype=torch.long)}
    batch["unreadable"] = unreadable
    return batch


class CleanLoader(DataLoader):
    """A DataLoader that leaves out batches in which no image could be read (see `clean_loader`)."""

    def __iter__(self) -> Iterator[dict[str, Any]]:  # type: ignore[override]
        for batch in super().__iter__():
            if len(batch[INDEX]):
                yield batch


def merge_view_specs(specs: list[ViewSpec]) -> ViewSpec:
    """The union of what several objectives need: the most crops of each kind any asks for.

    Crops of one kind come from one pipeline, so the objectives sharing it must agree on its recipe;
    one that takes any recipe (`any_crop_recipe`) follows the others.
    """
    recipes = {(s.plain_crop_scale, s.plain_color_jitter) for s in specs if s.plain_crops}
    if len(recipes) > 1:
        raise IncompatibleConfigError(
            f"objectives ask for plain crops with different (scale, colour jitter) {sorted(recipes)}: "
            "set the same objective.<name>.crop_scale (and color_jitter) for all of them."
        )
    scale, jitter = recipes.pop() if recipes else (ViewSpec().plain_crop_scale, 0.0)
    with_crops = [s for s in specs if s.global_crops]
    particular = [s for s in with_crops if not s.any_crop_recipe] or with_crops
    multicrop = {(s.crop_recipe, s.global_crop_scale, s.local_crop_scale) for s in particular}
    if len(multicrop) > 1:
        listed = ", ".join(sorted(f"({r.name}, {g}, {loc})" for r, g, loc in multicrop))
        raise IncompatibleConfigError(
            "objectives ask for multi-crop views with different (crop recipe, global_crop_scale, "
            f"local_crop_scale) {listed} (None = the dataset's scale): they share one pipeline, so set "
            "the same crop recipe and crop scales for all of them, or train them separately."
        )
    d = ViewSpec()
    recipe, global_scale, local_scale = (
        multicrop.pop() if multicrop else (d.crop_recipe, d.global_crop_scale, d.local_crop_scale)
    )
    merged = ViewSpec(
        global_crops=max((s.global_crops for s in specs), default=0),
        local_crops=max((s.local_crops for s in specs), default=0),
        plain_crops=max((s.plain_crops for s in specs), default=0),
        plain_crop_scale=scale,
        plain_color_jitter=jitter,
        crop_recipe=recipe,
        global_crop_scale=global_scale,
        local_crop_scale=local_scale,
    )
    if merged.local_crops and not merged.global_crops:
        raise IncompatibleConfigError("local crops need at least one global crop (global_crops >= 1).")
    if not (merged.global_crops or merged.plain_crops):
        raise IncompatibleConfigError("the objectives ask for no views at all.")
    return merged


def check_crop_sizes(views: ViewSpec, dataset_cfg: Any) -> None:
    """Local crops are the small views: larger than the global crops is a configuration mistake."""
    if views.local_crops and int(dataset_cfg.local_crop_size) > int(dataset_cfg.image_size):
        raise IncompatibleConfigError(
            f"dataset.local_crop_size={dataset_cfg.local_crop_size} is larger than the global crop size "
            f"dataset.image_size={dataset_cfg.image_size}: local crops must be the smaller views "
            f"(the standard multi-crop recipe uses 96 at 224); set dataset.local_crop_size <= "
            f"{dataset_cfg.image_size}."
        )


class MaskingCollate:
    """`default_collate`, then each masker adds its per-sample masks for the whole batch.

    Runs inside the DataLoader workers, so masks cost the training step nothing. Samples seeded by
    ResumableSampler seed the masks' generator from their seeds, so a batch's masks depend on
    which samples it holds only (exact resume); otherwise the worker's seeded RNG is used.
    """

    def __init__(self, maskers: Sequence[BatchMasker]) -> None:
        self.maskers = list(maskers)
        written: dict[str, BatchMasker] = {}
        for masker in self.maskers:
            for key in masker.keys:
                if key in written:
                    raise IncompatibleConfigError(
                        f"two batch maskers write batch key {key!r} ({written[key]!r} and {masker!r}): "
                        "give each objective's masker its own key prefix."
                    )
                written[key] = masker

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        seeds = [s.pop(SEED_KEY) for s in samples if SEED_KEY in s]
        generator = None
        if seeds and len(seeds) == len(samples):
            mixed = np.random.SeedSequence([s & 0xFFFFFFFF for s in seeds]).generate_state(2, np.uint32)
            generator = torch.Generator().manual_seed((int(mixed[0]) << 32) | int(mixed[1]))
        if samples and SOURCE in samples[0]:  # data.crop_on=device: one tensor of whole images
            check_one_size([s[SOURCE] for s in samples if SOURCE in s])
        batch = collate_readable(samples)  # batch["unreadable"]: the files skipped in this batch
        size = len(batch[INDEX])
        for masker in self.maskers:
            batch.update(masker(size, generator))
        return batch


class PretrainDataModule(pl.LightningDataModule):
    """Train loader of multi-crop views (per the objectives' ViewSpec) from `dataset` config."""

    def __init__(
        self,
        dataset_cfg: Any,
        views: ViewSpec,
        batch_size: int,
        num_workers: int,
        dataset: Dataset | None = None,
        maskers: Sequence[BatchMasker] = (),
        seed: int = 0,
        augment_on: str = "cpu",
        prefetch_factor: int = 2,
        crop_on: str = "worker",
        labelled_per_batch: int | None = None,
    ) -> None:
        """`dataset`: the already built "pretrain" split, so a folder is not scanned twice.

        `maskers`: the objectives' per-batch mask generators (MAE token masks, MFM frequency
        masks), run in the collate step. `seed`: the sample order and augmentations of every epoch.
        `labelled_per_batch` L: every batch holds L images with a label >= 0 (MixedBatchSampler);
        None: the plain shuffle.
        """
        super().__init__()
        if int(batch_size) < 1:
            raise IncompatibleConfigError(
                f"data.batch_size={batch_size}: it is the batch per device and must be >= 1 "
                "(the global batch is data.batch_size x devices x nodes x accumulate_grad_batches)."
            )
        check_crop_sizes(views, dataset_cfg)
        self.dataset_cfg = dataset_cfg
        self.views = views
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.dataset = dataset
        self.collate = MaskingCollate(maskers)
        self.seed = int(seed)
        if augment_on not in AUGMENT_ON:
            raise IncompatibleConfigError(
                f"data.augment_on={augment_on!r}; valid values: {', '.join(AUGMENT_ON)} (device: the "
                "photometric augmentations run batched on the GPU, for when the data workers cannot keep up)."
            )
        self.augment_on = augment_on
        if crop_on not in CROP_ON or (crop_on == "device" and augment_on != "device"):
            raise IncompatibleConfigError(
                f"data.crop_on={crop_on!r} with data.augment_on={augment_on!r}; valid: data.crop_on="
                f"{' or '.join(CROP_ON)}, and crop_on=device needs augment_on=device (the colour "
                "augmentations follow the crops onto the device)."
            )
        self.crop_on = crop_on
        self.prefetch_factor = int(prefetch_factor)
        self.labelled_per_batch = None if labelled_per_batch is None else int(labelled_per_batch)
        if self.labelled_per_batch is not None and is_stream_source(dataset):
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={labelled_per_batch} needs a dataset read by index, not a shard "
                "stream: set data.labelled_per_batch=null (labelled samples then come at their natural rate)."
            )
        if self.labelled_per_batch is not None and dataset is not None:
            self.make_sampler(1, 0)  # bad settings fail now, not at the first batch
        self.views_transform = self.transform()  # built once: the workers' half and the device's
        mean, std = tuple(dataset_cfg.mean), tuple(dataset_cfg.std)
        self.device_augment = self.views_transform.device_augment(mean, std)
        self.train_set: Dataset | None = None
        self.sampler: ResumableSampler | None = None
        self.resume_position: tuple[int, int] | None = None  # (epoch, batches done) from a checkpoint
        self.feed: StreamFeed | None = None  # set when the pretraining set is a shard stream

    def transform(self) -> PretrainViews:
        cfg, views = self.dataset_cfg, self.views
        multicrop = None
        if views.global_crops:
            multicrop = MultiCropTransform.from_config(
                cfg, views.global_crops, views.local_crops, recipe=views.crop_recipe,
                global_scale=views.global_crop_scale, local_scale=views.local_crop_scale,
            )
        plain = None
        if views.plain_crops:
            plain = PlainCropTransform(
                cfg.image_size, views.plain_crop_scale, tuple(cfg.mean), tuple(cfg.std),
                color_jitter=views.plain_color_jitter,
            )
        return PretrainViews(multicrop, plain, views.plain_crops, self.augment_on, self.crop_on)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            if self.dataset is None:
                self.dataset = build_dataset(self.dataset_cfg, "pretrain")
            self.train_set = TransformedDataset(self.dataset, self.views_transform, None)
            if is_stream_source(self.dataset) and self.feed is None:  # read in order, not by index
                self.feed = StreamFeed(self.dataset, self.dataset_cfg, self.views_transform, self.collate,
                                       self.batch_size, self.num_workers, self.seed, self.prefetch_factor)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        if self.feed is not None:
            return self.feed.loader(world, rank, lambda: self.trainer.current_epoch if self.trainer else 0)
        self.sampler = self.make_sampler(world, rank)
        if self.resume_position is not None:
            epoch, batches_done = self.resume_position
            self.sampler.resume_at(epoch, batches_done * self.batch_size)
            self.resume_position = None
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=self.sampler,
            drop_last=len(self.train_set) >= self.batch_size,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            collate_fn=self.collate,
            # Worker base seeds come from this generator, not the global RNG the training step uses,
            # so creating an iterator (again after a resume) leaves the step's randomness alone.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_interrupt,
        )

    def make_sampler(self, world: int, rank: int) -> ResumableSampler:
        """This rank's sampler: the plain shuffle, or batches with `labelled_per_batch` labelled."""
        size = len(self.dataset)  # type: ignore[arg-type]
        if self.labelled_per_batch is None:
            return ResumableSampler(size, world, rank, seed=self.seed)
        try:
            labels = dataset_labels(self.dataset)
        except ValueError as error:
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={self.labelled_per_batch}: {error}; "
                "set data.labelled_per_batch=null"
            ) from error
        labelled = np.flatnonzero(labels >= 0)
        if not len(labelled):
            raise IncompatibleConfigError(
                f"data.labelled_per_batch={self.labelled_per_batch}, but the pretraining set has no "
                "labelled image: use a labelled dataset (class folders for imagefolder) or set "
                "data.labelled_per_batch=null"
            )
        return MixedBatchSampler(
            labelled, size, self.batch_size, self.labelled_per_batch, world, rank, seed=self.seed
        )

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """augment_on=device: finish the uint8 crops on the device Lightning just moved them to."""
        if self.feed is not None:
            self.feed.observe(batch)  # the reader position of a batch the step takes now
        if self.device_augment is not None and isinstance(batch, dict):
            batch = self.device_augment(batch)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where training stands in the sample order: saved in every checkpoint."""
        trainer = self.trainer
        if trainer is None or (self.sampler is None and (self.feed is None or self.feed.plan is None)):
            return {}
        done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        epoch = int(trainer.current_epoch)
        if done >= trainer.num_training_batches:  # the epoch is over: the next one starts at 0
            epoch, done = epoch + 1, 0
        state = {"epoch": epoch, "batches_done": done, "batch_size": int(self.batch_size)}
        if self.feed is not None:
            state["stream"] = self.feed.state()  # every rank's reader positions
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next train loader continues the saved epoch's permutation after its done batches."""
        if state:
            self.resume_position = (int(state["epoch"]), int(state["batches_done"]))
            if "stream" in state:
                self.setup()
                if self.feed is not None:
                    self.feed.load(state["stream"], *self.resume_position)


def evenly_spaced_images(
    dataset: Dataset, dataset_cfg: Any, count: int, image_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` evenly spaced clean (normalised) images of a raw dataset and their labels.

    The same images every call, so pictures of different epochs or runs are comparable.
    """
    size = int(image_size or dataset_cfg.image_size)
    transform = eval_transform(size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std))
    count = min(int(count), len(dataset))
    # A broken file gives way to the next readable one, so it never stops a callback.
    samples = [next_readable(dataset, i * len(dataset) // count)[1] for i in range(count)]
    images = torch.stack([transform(image) for image, _ in samples])
    return images, torch.tensor([int(label) for _, label in samples])


def clean_loader(
    dataset: Dataset,
    dataset_cfg: Any,
    batch_size: int,
    num_workers: int,
    shard: tuple[int, int] = (0, 1),
    max_samples: int | None = None,
    only: Sequence[int] | None = None,
) -> DataLoader:
    """Un-augmented (resized / centre-cropped) images of a raw dataset for k-NN and probes.

    `shard=(rank, world)` gives each rank a disjoint slice; `max_samples` takes an evenly spaced
    subset (the same on every rank) to bound the cost of an online monitor; `only` reads just those
    dataset indices, in that order (a labelled 1 % needs 1 % of the images encoded). Unreadable
    images are left out with their labels, so a batch may be smaller than `batch_size`.
    """
    transform = eval_transform(dataset_cfg.image_size, tuple(dataset_cfg.mean), tuple(dataset_cfg.std))
    data = TransformedDataset(dataset, transform, "image", on_unreadable="drop")
    indices = list(range(len(data))) if only is None else [int(i) for i in only]
    if only is None and max_samples and max_samples < len(indices):
        step = len(indices) / max_samples
        indices = [int(i * step) for i in range(max_samples)]
    rank, world = shard
    subset = torch.utils.data.Subset(data, indices[rank::world])
    return CleanLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                       collate_fn=collate_readable, worker_init_fn=ignore_interrupt)
