"""Timing, peak memory and GPU utilisation, with the device synchronised around each measurement."""

from __future__ import annotations

import importlib.util
import resource
import threading
import time
from collections.abc import Callable

import torch


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
