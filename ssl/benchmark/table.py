"""The markdown table of benchmark rows and the line that says where they were measured."""

from __future__ import annotations

import math
import shlex
from typing import Any

import torch
from omegaconf import DictConfig

from ssl.benchmark.step import default_device


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
