"""Benchmark one training step against the least work it needs, in the same process.

`python -m ssl.benchmark objective=dino backbone=vit_t [any pretrain override] [bench.steps=20]`

Least work: the student's forward + backward over the same crops (one pass per resolution,
backbone and the heads the teacher mirrors, summed output as loss) plus the teacher's forward on
the global crops (data2vec: on the unmasked plain view). The full step adds the objective's
loss, gradient clipping, the optimizer step and the EMA update. Synthetic crops of the
configured sizes isolate the model from the data pipeline, which is measured separately
(images/s of the view transform, one process).

Masked image modeling (MAE, MFM) uses one plain crop per image; there the reference is a
full-token forward + backward of the same encoder, so MAE's step / reference ratio shows what
encoding only the visible tokens saves. For MAE the encoder alone on its visible tokens is timed
too (`visible_encoder_s`).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from ssl.backbones.multicrop import encode_crops
from ssl.data.datamodule import PretrainDataModule, merge_view_specs
from ssl.data.datasets import build_dataset
from ssl.module import SSLModule
from ssl.pretrain import CONFIG_DIR, build_module


def dataset_size(cfg: DictConfig) -> int:
    """`bench.num_samples`, else the configured dataset's size (CoKe's label memory), else ImageNet's."""
    if cfg.bench.get("num_samples"):
        return int(cfg.bench.num_samples)
    try:
        return len(build_dataset(cfg.dataset, "pretrain"))
    except (FileNotFoundError, ValueError):
        return 1_281_167


def synthetic_batch(cfg: DictConfig, module: SSLModule, device: torch.device) -> dict[str, Any]:
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    b, d = cfg.data.batch_size, cfg.dataset
    crops = [torch.randn(b, 3, d.image_size, d.image_size) for _ in range(views.global_crops)]
    crops += [torch.randn(b, 3, d.local_crop_size, d.local_crop_size) for _ in range(views.local_crops)]
    batch: dict[str, Any] = {"label": torch.zeros(b, dtype=torch.long), "index": torch.arange(b)}
    if crops:
        batch["views"] = crops
    if views.plain_crops:
        size = (b, 3, d.image_size, d.image_size)
        batch["plain_views"] = [torch.randn(size) for _ in range(views.plain_crops)]
    for objective in module.objectives.values():
        for masker in objective.batch_maskers():
            batch.update(masker(b))
    return {k: [t.to(device) for t in v] if isinstance(v, list) else v.to(device) for k, v in batch.items()}


def student_crops(batch: dict[str, Any]) -> list[torch.Tensor]:
    return list(batch.get("views", [])) + list(batch.get("plain_views", []))


def training_step(
    module: SSLModule,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    dtype: torch.dtype | None = None,
) -> None:
    """One optimizer step as Lightning drives it: closure (forward, backward, guard, clipping), the
    step, the EMA; under autocast to `dtype` when given."""
    device_type = next(module.parameters()).device.type

    def closure() -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        loss.backward()
        module.on_before_optimizer_step(optimizer)
        return loss

    module.optimizer_step(0, 0, optimizer, closure)
    optimizer.zero_grad(set_to_none=True)


def time_it(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(cfg: DictConfig, steps: int = 10, warmup: int = 3) -> dict[str, Any]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    module = build_module(cfg, num_samples=dataset_size(cfg)).to(device)
    module.train()
    optimizer = module.configure_optimizers()
    module.schedules = module.build_schedules(10_000, 100)
    batch = synthetic_batch(cfg, module, device)
    n_global = merge_view_specs([o.view_spec() for o in module.objectives.values()]).global_crops
    # The teacher sees DINO's global crops, or the plain view (data2vec: the unmasked image).
    teacher_crops = batch["views"][:n_global] if n_global else batch.get("plain_views", [])[:1]
    student = module.mirrored_by_teacher()
    teacher = module.teacher.module if module.teacher is not None else None
    dtype = torch.bfloat16 if device.type == "cuda" else None

    def encode_through(net: torch.nn.ModuleDict, crops: list[torch.Tensor]) -> torch.Tensor:
        feats = encode_crops(net["backbone"], crops)
        outs = [feats] + [head(feats) for key, head in net.items() if key != "backbone"]
        return sum(o.float().mean() for o in outs)

    def least_work() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = encode_through(student, student_crops(batch))
            if teacher is not None:
                with torch.no_grad():
                    encode_through(teacher, teacher_crops)
        loss.backward()
        student.zero_grad(set_to_none=True)

    def visible_encoder() -> None:
        """MAE's encoder alone, on the visible tokens (what the full-token reference compares to)."""
        mae = module.objectives["mae"]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            latent, _ = mae.encode_visible(module.backbone, batch["plain_views"][0], batch["mae_ids_shuffle"])
        latent.float().mean().backward()
        module.backbone.zero_grad(set_to_none=True)

    def full_step() -> None:
        training_step(module, optimizer, batch, dtype)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_least = time_it(least_work, steps, warmup, device)
        t_step = time_it(full_step, steps, warmup, device)
        t_visible = time_it(visible_encoder, steps, warmup, device) if "mae" in module.objectives else None
    images = cfg.data.batch_size
    result = {
        "objective": ",".join(cfg.objective.keys()),
        "backbone": cfg.backbone.name,
        "dataset": cfg.dataset.name,
        "batch_size": images,
        "crops": [tuple(c.shape[-2:]) for c in student_crops(batch)],
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "step_s": t_step,
        "images_per_s": images / t_step,
        "least_work_s": t_least,
        "least_work_images_per_s": images / t_least,
        "overhead_ratio": t_step / t_least,
        "peak_memory_mb": peak_memory_mb(device),
    }
    if t_visible is not None:
        result["visible_encoder_s"] = t_visible
        result["full_tokens_over_visible_encoder"] = t_least / t_visible
    if cfg.bench.data_pipeline:
        result["data_images_per_s_per_worker"] = data_pipeline_rate(cfg, module)
    return result


def data_pipeline_rate(cfg: DictConfig, module: SSLModule, n: int = 300) -> float:
    """Images per second through the views transform in one process (one data-loader worker)."""
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    transform = PretrainDataModule(cfg.dataset, views, 1, 0).transform()
    try:
        dataset = build_dataset(cfg.dataset, "pretrain")
    except FileNotFoundError:
        return float("nan")
    images = [dataset[i][0] for i in range(min(n, len(dataset)))]
    start = time.perf_counter()
    for image in images:
        transform(image)
    return len(images) / (time.perf_counter() - start)


def markdown_row(r: dict[str, Any]) -> str:
    return (f"| {r['objective']} | {r['backbone']} | {r['batch_size']} | {r['images_per_s']:.1f} | "
            f"{r['least_work_images_per_s']:.1f} | {r['overhead_ratio']:.3f} | "
            f"{r['peak_memory_mb']:.0f} | {r.get('data_images_per_s_per_worker', float('nan')):.0f} |")


MARKDOWN_HEADER = ("| objective | backbone | batch | step img/s | least-work img/s | step / least work "
                   "| peak MB | data img/s/worker |\n|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    bench_args = [a.removeprefix("bench.") for a in args if a.startswith("bench.")]
    overrides = [a for a in args if not a.startswith("bench.")]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    bench = OmegaConf.create(
        {"steps": 10, "warmup": 3, "data_pipeline": True, "json": None, "num_samples": None}
    )
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = None
    cfg.bench = OmegaConf.merge(bench, OmegaConf.from_dotlist(bench_args))
    torch.manual_seed(0)
    result = benchmark(cfg, cfg.bench.steps, cfg.bench.warmup)
    print(json.dumps(result, indent=2))
    print(MARKDOWN_HEADER)
    print(markdown_row(result))
    if cfg.bench.json:
        Path(cfg.bench.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
