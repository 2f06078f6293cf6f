"""Benchmark training steps against the least work they need, in the same process.

`python -m ssl.benchmark objective=dino backbone=vit_t [any pretrain override] [bench.steps=20]`
`python -m ssl.benchmark bench.objectives=[dino,mae,dino+mfm] bench.backbones=[vit_t,resnet18]`

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

Settings (`bench.<key>=<value>`; the other arguments are pretraining overrides):

- `objectives`, `backbones`: lists; one run per pair (`objective=<o> backbone=<b>` added to the
  other overrides; `dino+mfm` or `[dino,mfm]` is one composite). `objective.<name>.*`
  overrides reach only the runs that train `<name>` (with a plain `objective=...` too). A pair
  that fails (MAE on a ResNet) is a row with the reason; the call fails only when none ran.
- `isolate` (true): each run in a fresh process, since peak RSS (ru_maxrss) only grows over a
  process's life; on CUDA the peak allocation is reset per run either way.
- `precision`: auto (bf16 autocast on CUDA, float32 on CPU) | 32 | bf16 | fp16 (CUDA only,
  with a GradScaler as Lightning's 16-mixed).
- `real_data` (false): steps/s pulling batches from the real train loader (`data.num_workers`
  workers, pinned memory on CUDA, non-blocking copy, the data module's `on_after_batch_transfer`)
  vs the same steps on one batch already on the device; their ratio says whether the data
  pipeline keeps up.
- `json`, `markdown`: files for the list of rows and the table (both are also printed).
- `steps` (10), `warmup` (3), `data_pipeline` (true), `num_samples` (CoKe's label memory).

On CUDA with pynvml installed, GPU utilisation is sampled during the timed steps.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import math
import platform
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf
from pytorch_lightning.utilities import move_data_to_device

from ssl.backbones.multicrop import encode_crops
from ssl.data.datamodule import PretrainDataModule, merge_view_specs
from ssl.data.datasets import build_dataset
from ssl.module import SSLModule
from ssl.objectives.base import IncompatibleConfigError
from ssl.pretrain import CONFIG_DIR, build_module

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
BENCH_DEFAULTS: dict[str, Any] = {
    "steps": 10, "warmup": 3, "data_pipeline": True, "num_samples": None,
    "objectives": None, "backbones": None, "isolate": True, "precision": "auto", "real_data": False,
    "json": None, "markdown": None,
    "result_file": None,  # internal: where an isolated run's process writes its row
}
# The settings an isolated run's process needs; the others belong to the calling process.
CHILD_SETTINGS = ("steps", "warmup", "data_pipeline", "num_samples", "precision", "real_data")
PRECISIONS = {"32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def dataset_size(cfg: DictConfig) -> int:
    """`bench.num_samples`, else the configured dataset's size (CoKe's label memory), else ImageNet's."""
    if cfg.bench.get("num_samples"):
        return int(cfg.bench.num_samples)
    try:
        return len(build_dataset(cfg.dataset, "pretrain"))
    except (FileNotFoundError, ValueError):
        return 1_281_167


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_precision(precision: Any, device: torch.device) -> str:
    """"32", "bf16" or "fp16" for `bench.precision` on `device`; auto: bf16 on CUDA (what
    ssl.pretrain picks on GPUs that support it), float32 on the CPU."""
    name = str(precision).lower().removesuffix("-mixed").removesuffix("-true")
    name = {"auto": "bf16" if device.type == "cuda" else "32", "16": "fp16", "fp32": "32"}.get(name, name)
    if name not in PRECISIONS:
        raise ValueError(f"bench.precision={precision}: valid values are auto, 32, bf16, fp16")
    if name == "fp16" and device.type != "cuda":
        raise ValueError(
            "bench.precision=fp16 needs a CUDA device: CPU autocast in float16 is not what any "
            "training run uses. Use bench.precision=32 or bf16 on the CPU."
        )
    return name


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


class ScaledOptimizer:
    """What Lightning's 16-mixed plugin does around `optimizer.step(closure)`: run the closure
    (scaled backward, unscaling, the hooks), then let the GradScaler step (it skips overflows)
    and update its scale."""

    def __init__(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> None:
        self.optimizer = optimizer
        self.scaler = scaler

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def step(self, closure: Callable[[], torch.Tensor]) -> None:
        closure()
        self.scaler.step(self.optimizer)
        self.scaler.update()


def attach_grad_scaler(module: SSLModule, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler the module sees as its Trainer's (fp16): it unscales before the non-finite
    check and clipping, and counts the scaler's overflows apart from real failures."""
    scaler = torch.amp.GradScaler(device.type)
    module.grad_scaler = lambda: scaler
    return scaler


def training_step(
    module: SSLModule,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, Any],
    dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """One optimizer step as Lightning drives it: closure (forward, backward, guard, clipping), the
    step, the EMA; under autocast to `dtype` when given, with `scaler`'s loss scaling (fp16)."""
    device_type = next(module.parameters()).device.type

    def closure() -> torch.Tensor:
        with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        if scaler is not None and not getattr(optimizer, "_step_supports_amp_scaling", False):
            scaler.unscale_(optimizer)  # the fused AdamW unscales in its own step (SSLModule does it)
        module.on_before_optimizer_step(optimizer)
        return loss

    module.optimizer_step(0, 0, ScaledOptimizer(optimizer, scaler) if scaler else optimizer, closure)
    optimizer.zero_grad(set_to_none=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Median seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def total_time(fn: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for `steps` calls in a row after `warmup` calls: stalls between steps count."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class UtilisationSampler:
    """Mean of `sample()` (GPU utilisation, %) taken every `interval_s` by a thread while the
    block runs, plus once at its end so short blocks get a value; None without a sampler."""

    def __init__(self, sample: Callable[[], float] | None, interval_s: float = 0.1) -> None:
        self.sample = sample
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.samples.append(float(self.sample()))

    def __enter__(self) -> UtilisationSampler:
        if self.sample is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.samples.append(float(self.sample()))

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def gpu_utilisation_sampler(device: torch.device) -> Callable[[], float] | None:
    """torch.cuda.utilization on `device` when it works (CUDA and pynvml), else None."""
    if device.type != "cuda" or importlib.util.find_spec("pynvml") is None:
        return None
    try:
        torch.cuda.utilization(device)
    except Exception:  # noqa: BLE001 - no NVML driver library, no permission: no reading
        return None
    return lambda: float(torch.cuda.utilization(device))


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
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    maskers = [m for o in module.objectives.values() for m in o.batch_maskers()]
    data = PretrainDataModule(
        cfg.dataset, views, cfg.data.batch_size, cfg.data.num_workers, dataset=dataset, maskers=maskers,
        seed=cfg.seed,
    )
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
    n_global = merge_view_specs([o.view_spec() for o in module.objectives.values()]).global_crops
    # The teacher sees DINO's global crops, or the plain view (data2vec: the unmasked image).
    teacher_crops = batch["views"][:n_global] if n_global else batch.get("plain_views", [])[:1]
    student = module.mirrored_by_teacher()
    teacher = module.teacher.module if module.teacher is not None else None

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
        (scaler.scale(loss) if scaler is not None else loss).backward()
        student.zero_grad(set_to_none=True)

    def visible_encoder() -> None:
        """MAE's encoder alone, on the visible tokens (what the full-token reference compares to)."""
        mae = module.objectives["mae"]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            latent, _ = mae.encode_visible(module.backbone, batch["plain_views"][0], batch["mae_ids_shuffle"])
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
        t_visible = time_it(visible_encoder, steps, warmup, device) if "mae" in module.objectives else None
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
    """Images per second through the views transform in one process (one data-loader worker)."""
    views = merge_view_specs([o.view_spec() for o in module.objectives.values()])
    transform = PretrainDataModule(cfg.dataset, views, 1, 0).transform()
    try:
        dataset = build_dataset(cfg.dataset, "pretrain")
    except (FileNotFoundError, ValueError):
        return float("nan")
    images = [dataset[i][0] for i in range(min(n, len(dataset)))]
    start = time.perf_counter()
    for image in images:
        transform(image)
    return len(images) / (time.perf_counter() - start)


# --------------------------------------------------------------------------------------------
# Several runs: the plan, one run in this process or in its own, the table
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One benchmark: its pretraining overrides and the names a failed run is reported under."""

    objective: str
    backbone: str
    overrides: list[str]


def override_value(overrides: list[str], key: str) -> str | None:
    """The last `key=<value>` among Hydra overrides (`+key=`, `++key=` too), else None."""
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == key and "=" in o]
    return values[-1] if values else None


def objective_names(spec: Any) -> list[str]:
    """`dino`, `dino+mfm` or a list `[dino, mfm]` as objective names."""
    parts = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else str(spec).split("+")
    return [str(s).strip() for s in parts if str(s).strip()]


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple, ListConfig)) else [value]


OBJECTIVE_KEY = re.compile(r"^[+~]*objective\.([^.=]+)")


def applies_to(override: str, objectives: list[str]) -> bool:
    """False for another objective's `objective.<name>.*` setting (a run of `objectives` would
    fail on it), True for everything else."""
    match = OBJECTIVE_KEY.match(override)
    return match is None or match.group(1) in objectives


def planned_runs(overrides: list[str], bench: DictConfig) -> list[Run]:
    """The cross product of `bench.objectives` x `bench.backbones`, or one run of `overrides`."""
    objectives, backbones = bench.get("objectives"), bench.get("backbones")
    runs = []
    for names in [None] if objectives is None else [objective_names(o) for o in as_list(objectives)]:
        base = list(overrides)
        named = override_value(overrides, "objective")
        objective = ",".join(objective_names(named.strip("[]").split(","))) if named else "default"
        if names is not None:  # this run's objectives replace any `objective=`
            objective = ",".join(names)
            base = [o for o in base if override_value([o], "objective") is None]
            base.append(f"objective={names[0]}" if len(names) == 1 else f"objective=[{objective}]")
        if names is not None or named is not None:  # other objectives' settings do not apply
            base = [o for o in base if applies_to(o, objective.split(","))]
        for backbone in [None] if backbones is None else as_list(backbones):
            if backbone is None:
                runs.append(Run(objective, override_value(overrides, "backbone") or "default", base))
            else:
                kept = [o for o in base if override_value([o], "backbone") is None]
                runs.append(Run(objective, str(backbone), [*kept, f"backbone={backbone}"]))
    return runs


def compose_config(overrides: list[str], bench: DictConfig) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", *overrides])
    OmegaConf.set_struct(cfg, False)
    cfg.run_dir = None
    cfg.bench = bench
    return cfg


def failed_row(
    run: Run, status: str, reason: str, cfg: DictConfig | None = None, **extra: Any
) -> dict[str, Any]:
    """The row of a run that did not finish: why, and what it would have measured."""
    row = {"status": status, "objective": run.objective, "backbone": run.backbone, "reason": reason}
    if cfg is not None:
        row.update(objective=",".join(cfg.objective.keys()), backbone=cfg.backbone.name,
                   batch_size=cfg.data.batch_size)
    return {**row, **extra}


def run_in_process(run: Run, bench: DictConfig) -> dict[str, Any]:
    """One run here; a failure (an incompatible pair, a bad override) becomes its row."""
    cfg = None
    precision = resolve_precision(bench.precision, default_device())
    try:
        cfg = compose_config(run.overrides, bench)
        torch.manual_seed(0)
        row = benchmark(cfg, int(bench.steps), int(bench.warmup))
    except IncompatibleConfigError as error:
        return failed_row(run, "incompatible", str(error), cfg, precision=precision, isolated=False)
    except Exception as error:  # noqa: BLE001 - reported in the row; the other runs go on
        traceback.print_exc()
        reason = f"{type(error).__name__}: {error}"
        return failed_row(run, "error", reason, cfg, precision=precision, isolated=False)
    return {**row, "isolated": False}


def run_isolated(run: Run, bench: DictConfig) -> dict[str, Any]:
    """One run in a fresh Python process (honest peak RSS); it writes its row to a temp file."""
    with tempfile.TemporaryDirectory(prefix="ssl-bench-") as tmp:
        result = Path(tmp) / "row.json"
        settings = [f"bench.{k}={'null' if bench[k] is None else bench[k]}" for k in CHILD_SETTINGS]
        code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from ssl.benchmark import main; main()"
        command = [sys.executable, "-c", code, str(PACKAGE_ROOT), *run.overrides, *settings,
                   "bench.isolate=false", f"bench.result_file={result}"]
        returncode = subprocess.run(command, stdout=subprocess.DEVNULL, check=False).returncode
        if result.is_file():
            return {**json.loads(result.read_text())[0], "isolated": True}
    cause = f"exit code {returncode}"
    if returncode < 0:
        cause = f"killed by {signal.Signals(-returncode).name}"
        cause += " (out of memory?)" if returncode == -signal.SIGKILL else ""
    return failed_row(run, "error", f"the benchmark process ended without a result ({cause}; "
                      "its stderr is above)", isolated=True)


def cell(value: Any, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return format(value, fmt)


COLUMNS = [  # (header, key, format); the first group is always shown
    ("step img/s", "images_per_s", ".1f"),
    ("least-work img/s", "least_work_images_per_s", ".1f"),
    ("step / least work", "overhead_ratio", ".3f"),
    ("peak MB", "peak_memory_mb", ".0f"),
    ("data img/s/worker", "data_images_per_s_per_worker", ".0f"),
]
GPU_COLUMNS = [("GPU util %", "gpu_utilisation_pct", ".0f")]
REAL_DATA_COLUMNS = [
    ("real-data steps/s", "real_data_steps_per_s", ".2f"),
    ("on-device steps/s", "device_data_steps_per_s", ".2f"),
    ("keeps up (real / on-device)", "pipeline_keeps_up", ".2f"),
]


def markdown_table(rows: list[dict[str, Any]], header: str | None = None) -> str:
    """A line about the setup (`header`), then one table row per run; the GPU, real-data and
    note columns appear when some row has them."""
    columns = list(COLUMNS)
    if any(r.get("gpu_utilisation_pct") is not None for r in rows):
        columns += GPU_COLUMNS
    if any("real_data_steps_per_s" in r for r in rows):
        columns += REAL_DATA_COLUMNS
    notes = [r.get("reason") or r.get("real_data_error") or "" for r in rows]
    names = ["objective", "backbone", "batch", "precision", *(c[0] for c in columns)]
    names += ["note"] if any(notes) else []
    lines = ([header, ""] if header else []) + ["| " + " | ".join(names) + " |", "|---" * len(names) + "|"]
    for r, note in zip(rows, notes):
        values = [r["objective"], r["backbone"], str(r.get("batch_size", "—")), str(r.get("precision", "—"))]
        values += [cell(r.get(key), fmt) for _, key, fmt in columns]
        if any(notes):
            status = "" if r.get("status") == "ok" else f"{r.get('status')}: "
            values.append((status + note).replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def setup_line(rows: list[dict[str, Any]], bench: DictConfig, args: list[str]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    devices = sorted({str(r["device"]) for r in ok}) or [default_device().type]
    threads = sorted({str(r["threads"]) for r in ok}) or [str(torch.get_num_threads())]
    precision = str(bench.precision)
    resolved = sorted({r["precision"] for r in ok})
    if precision == "auto" and resolved:
        precision += f" ({', '.join(resolved)})"
    command = shlex.join(["python", "-m", "ssl.benchmark", *args])
    return (f"Device: {', '.join(devices)}; threads: {', '.join(threads)}; torch {torch.__version__}; "
            f"precision: {precision}; `{command}`")


def parse_args(args: list[str]) -> tuple[list[str], DictConfig]:
    """(pretraining overrides, bench settings); an unknown bench setting is an error."""
    given = OmegaConf.from_dotlist([a.removeprefix("bench.") for a in args if a.startswith("bench.")])
    unknown = sorted(set(given) - set(BENCH_DEFAULTS))
    if unknown:
        raise SystemExit(f"error: unknown setting(s) {', '.join('bench.' + k for k in unknown)}; "
                         f"valid: {', '.join('bench.' + k for k in BENCH_DEFAULTS if k != 'result_file')}")
    bench = OmegaConf.merge(OmegaConf.create(BENCH_DEFAULTS), given)
    if int(bench.steps) < 1 or int(bench.warmup) < 0:
        raise SystemExit(f"error: bench.steps={bench.steps} must be >= 1 and bench.warmup >= 0")
    return [a for a in args if not a.startswith("bench.")], bench


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    overrides, bench = parse_args(args)
    try:
        resolve_precision(bench.precision, default_device())
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    if bench.result_file:  # an isolated run's process: its one row goes to the caller's file
        row = run_in_process(Run(override_value(overrides, "objective") or "default",
                                 override_value(overrides, "backbone") or "default", overrides), bench)
        Path(bench.result_file).write_text(json.dumps([row]))
        return
    runs = planned_runs(overrides, bench)
    rows = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {' '.join(run.overrides)}", file=sys.stderr, flush=True)
        rows.append(run_isolated(run, bench) if bench.isolate else run_in_process(run, bench))
    text = json.dumps(rows, indent=2)
    table = markdown_table(rows, setup_line(rows, bench, args))
    print(text)
    print(table)
    if bench.json:
        Path(bench.json).write_text(text + "\n")
    if bench.markdown:
        Path(bench.markdown).write_text(table + "\n")
    if not any(r["status"] == "ok" for r in rows):
        reasons = "; ".join(f"{r['objective']} x {r['backbone']}: {r['reason']}" for r in rows)
        raise SystemExit(f"error: none of the {len(rows)} benchmark runs ran ({reasons})")


if __name__ == "__main__":
    main()
