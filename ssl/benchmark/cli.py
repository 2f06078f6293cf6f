"""`python -m ssl.benchmark`: parse `bench.*` settings, run the plan, print and write JSON + markdown."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl.benchmark.runs import Run, override_value, planned_runs, run_in_process, run_isolated
from ssl.benchmark.step import default_device, resolve_precision
from ssl.benchmark.table import markdown_table, setup_line

BENCH_DEFAULTS: dict[str, Any] = {
    "steps": 10, "warmup": 3, "data_pipeline": True, "num_samples": None,
    "objectives": None, "backbones": None, "isolate": True, "precision": "auto", "real_data": False,
    "json": None, "markdown": None,
    "result_file": None,  # internal: where an isolated run's process writes its row
}


def strict_json(row: dict[str, Any]) -> dict[str, Any]:
    """NaN (a value that could not be measured) as null, which every JSON reader accepts."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in row.items()}


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
    text = json.dumps([strict_json(r) for r in rows], indent=2)
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
