"""One benchmark row: full step vs least work, the data pipeline, real data vs data on the device."""

from __future__ import annotations

import gc
import platform
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import move_data_to_device

from ssl.backbones.multicrop import encode_crops
from ssl.benchmark.step import (
    PRECISIONS,
    attach_grad_scaler,
    dataset_size,
    default_device,
    resolve_precision,
    student_crops,
    synthetic_batch,
    training_step,
)
from ssl.benchmark.timing import (
    UtilisationSampler,
    gpu_utilisation_sampler,
    peak_memory_mb,
    time_it,
    total_time,
)
from ssl.data.datasets import build_dataset
from ssl.data.spec import PLAIN_VIEWS, VIEWS
from ssl.module import SSLModule
from ssl.pretrain import build_datamodule, build_module


def endless(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (persistent workers are reused)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise RuntimeError("the train loader yields no batches")


def real_data_rates(
    cfg: DictConfig,
    module: SSLModule,
    dataset: Any,
    step: Callable[[dict[str, Any]], None],
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Steps/s with batches from the real train loader (as ssl.pretrain builds it, through the
    transfer and `on_after_batch_transfer` Lightning would do) vs on one batch already on the
    device: whether the data pipeline keeps the model fed."""
    data = build_datamodule(cfg, module, dataset)
    batches = endless(data.train_dataloader())

    def next_batch() -> dict[str, Any]:
        return data.on_after_batch_transfer(move_data_to_device(next(batches), device), 0)

    on_device = next_batch()  # fetched before timing: worker start-up is not a step
    for _ in range(warmup):
        step(next_batch())
    with UtilisationSampler(gpu_utilisation_sampler(device)) as real_util:
        real_s = total_time(lambda: step(next_batch()), steps, 0, device)
    batches.close()  # ends the loader's iteration, so its workers can go
    device_s = total_time(lambda: step(on_device), steps, warmup, device)
    real, on_dev = steps / real_s, steps / device_s
    return {
        "real_data_steps_per_s": real,
        "device_data_steps_per_s": on_dev,
        "pipeline_keeps_up": real / on_dev,
        "real_data_gpu_utilisation_pct": real_util.mean,
        "num_workers": int(cfg.data.num_workers),
    }


def least_work_student(module: SSLModule) -> torch.nn.ModuleDict:
    """The student the least work runs: the backbone plus every objective's head on pooled
    features (the heads the teacher mirrors, and CoKe's projector and predictor)."""
    parts: dict[str, torch.nn.Module] = {"backbone": module.backbone}
    for name, objective in module.objectives.items():
        head = objective.pooled_feature_heads()
        if head is not None:
            parts[name] = head
    return torch.nn.ModuleDict(parts)


def teacher_inputs(module: SSLModule, batch: dict[str, Any]) -> list[tuple[torch.nn.ModuleDict, list]]:
    """Every EMA teacher with what it encodes in a step: its objectives' global crops (DINO), or
    the plain view when they take none (data2vec: the unmasked image). `[dino,data2vec]` keeps two."""
    pairs = []
    for key, teacher in module.ema_teachers().items():
        users = [name for name, used in module.teacher_keys.items() if used == key]
        n_global = max(module.objectives[name].view_spec().global_crops for name in users)
        crops = batch[VIEWS][:n_global] if n_global else batch.get(PLAIN_VIEWS, [])[:1]
        pairs.append((teacher.module, crops))
    return pairs


def benchmark(cfg: DictConfig, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    device = default_device()
    precision = resolve_precision(cfg.bench.get("precision", "auto"), device)
    dtype = PRECISIONS[precision]
    if device.type == "cuda":  # this run's peak, not an earlier one's in the same process
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    dataset, data_error = None, None
    if cfg.bench.get("real_data"):
        try:
            dataset = build_dataset(cfg.dataset, "pretrain")
        except (FileNotFoundError, ValueError) as error:
            data_error = str(error)
    # Real batches carry real indices: CoKe's label memory must hold the whole dataset.
    module = build_module(cfg, num_samples=len(dataset) if dataset is not None else dataset_size(cfg))
    module = module.to(device)
    module.train()
    optimizer = module.configure_optimizers()
    module.schedules = module.build_schedules(10_000, 100)
    scaler = attach_grad_scaler(module, device) if dtype is torch.float16 else None
    batch = synthetic_batch(cfg, module, device)
    teachers = teacher_inputs(module, batch)
    student = least_work_student(module)

    def encode_through(net: torch.nn.ModuleDict, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = encode_crops(net["backbone"], crops)
        outs = [feats] + [head(feats) for key, head in net.items() if key != "backbone"]
        flat = [t for o in outs for t in (o if isinstance(o, (tuple, list)) else (o,))]
        return sum(t.float().mean() for t in flat)

    def least_work() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = encode_through(student, student_crops(batch))
            with torch.no_grad():
                for teacher, crops in teachers:
                    encode_through(teacher, crops)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        student.zero_grad(set_to_none=True)

    # MAE / data2vec 2.0: the student encoder on the visible tokens only (data2vec 2.0: of every clone).
    dropping = next((o for o in module.objectives.values() if hasattr(o, "encode_visible")), None)

    def visible_encoder() -> None:
        """The encoder alone on the visible tokens (what the full-token reference compares to)."""
        ids_key = dropping.batch_maskers()[0].ids_shuffle_key
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            latent, _ = dropping.encode_visible(module.backbone, batch[PLAIN_VIEWS][0], batch[ids_key])
        latent.float().mean().backward()
        module.backbone.zero_grad(set_to_none=True)

    def step_on(data: dict[str, Any]) -> None:
        training_step(module, optimizer, data, dtype, scaler)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        t_least = time_it(least_work, steps, warmup, device)
        for _ in range(warmup):  # outside the utilisation samples
            step_on(batch)
        with UtilisationSampler(gpu_utilisation_sampler(device)) as util:
            t_step = time_it(lambda: step_on(batch), steps, 0, device)
        t_visible = time_it(visible_encoder, steps, warmup, device) if dropping is not None else None
        peak_mb = peak_memory_mb(device)  # the step's, before the data loader's buffers
        real = None
        if dataset is not None:
            real = real_data_rates(cfg, module, dataset, step_on, device, steps, warmup)
    images = cfg.data.batch_size
    result = {
        "status": "ok",
        "objective": ",".join(cfg.objective.keys()),
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "batch_size": images,
        "precision": precision,
        "crops": [tuple(c.shape[-2:]) for c in student_crops(batch)],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "step_s": t_step,
        "images_per_s": images / t_step,
        "least_work_s": t_least,
        "least_work_images_per_s": images / t_least,
        "overhead_ratio": t_step / t_least,
        "peak_memory_mb": peak_mb,
        "gpu_utilisation_pct": util.mean,
    }
    if t_visible is not None:
        result["visible_encoder_s"] = t_visible
        result["full_tokens_over_visible_encoder"] = t_least / t_visible
    if cfg.bench.data_pipeline:
        result["data_images_per_s_per_worker"] = data_pipeline_rate(cfg, module)
    if cfg.bench.get("real_data"):
        nan = float("nan")
        result.update(real or {
            "real_data_steps_per_s": nan, "device_data_steps_per_s": nan, "pipeline_keeps_up": nan,
            "real_data_gpu_utilisation_pct": None, "real_data_error": data_error,
        })
    return result


def data_pipeline_rate(cfg: DictConfig, module: SSLModule, n: int = 300) -> float:
    """Images per second through the views transform in one process (one data-loader worker).

    With data.augment_on=device that is the worker's share only (crop, flip, uint8, draws)."""
    transform = build_datamodule(cfg, module).views_transform
    try:
        dataset = build_dataset(cfg.dataset, "pretrain")
    except (FileNotFoundError, ValueError):
        return float("nan")
    images = [dataset[i][0] for i in range(min(n, len(dataset)))]
    start = time.perf_counter()
    for image in images:
        transform(image)
    return len(images) / (time.perf_counter() - start)
