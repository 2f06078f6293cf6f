"""Keep an interrupted run's metrics.csv rows when it resumes in the same run directory.

Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run would lose
the curve before the crash. The rows up to the resumed step are put back (later rows came from
steps the resumed run recomputes), and the writer appends to them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytorch_lightning as pl


def read_rows_up_to(path: Path, step: int) -> tuple[list[str], list[dict[str, str]]]:
    """The header and the rows logged at or before `step` of a metrics.csv (empty if none)."""
    if not path.is_file():
        return [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r.get("step", "") == "" or int(float(r["step"])) <= step]
        return list(reader.fieldnames or []), rows


def csv_logger(save_dir: Path, resume_step: int | None) -> pl.loggers.CSVLogger:
    """CSVLogger at <save_dir>/logs; when resuming at `resume_step`, continuing the old file."""
    logger = pl.loggers.CSVLogger(save_dir=str(save_dir), name="logs", version="")
    if resume_step is None:
        return logger
    path = Path(logger.log_dir) / "metrics.csv"
    header, rows = read_rows_up_to(path, resume_step)
    writer = logger.experiment  # created now: it removes the old file
    if header:
        with open(path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = sorted(header)
    return logger
