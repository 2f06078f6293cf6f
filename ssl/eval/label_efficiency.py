"""`python -m ssl.eval.label_efficiency`: k-NN, linear probe and fine-tuning at 1 %, 10 %, 100 % labels.

One table of how an encoder does with few labels: every method of `methods` (ssl.eval.knn,
ssl.eval.linear, ssl.eval.finetune, each with its own config) runs at every fraction of
`fractions`, on the seeded per-class subset `labelled_fraction=<f>` of train (1.0: all of it),
scored on the whole test split. The same command line as the single commands: `checkpoint=`,
`dataset=`, `backbone=` ... go to every method, a method's own settings (`k=`, `probe.*`,
`finetune.*`) to that method only, and `fractions`, `methods`, `output`, `knn_k`, `wandb.*` to
the table (conf/eval/label_efficiency.yaml). Features are extracted once per split and read from
the cache for the other fractions (with `cache=true`, the default). Writes JSON and a markdown
table beside the checkpoint (`<stem>.label_efficiency.json` / `.md`) or at `output=<path>`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ssl.config import CONFIG_DIR
from ssl.eval.cli import as_list, run_command
from ssl.eval.labelled import LABELLED_KEYS
from ssl.eval.report import output_path

NAME = "label_efficiency"
METHODS = ("knn", "linear", "finetune")
TITLES = {"knn": "k-NN", "linear": "linear", "finetune": "fine-tune"}
GROUPS = ("dataset", "backbone", "hydra")  # config groups every method composes


def method_evaluate(method: str) -> Callable[[DictConfig], dict[str, Any]]:
    """The `evaluate` of ssl.eval.<method> (imported on use: fine-tuning pulls in timm.data)."""
    import importlib

    return importlib.import_module(f"ssl.eval.{method}").evaluate


def compose(config_name: str, overrides: Sequence[str]) -> DictConfig:
    """A config of conf/ composed by Hydra with `overrides`, as `python -m` would."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=list(overrides))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3", job_name=NAME):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def route_overrides(
    overrides: Sequence[str], table_keys: Sequence[str], method_keys: dict[str, Sequence[str]]
) -> tuple[list[str], dict[str, list[str]]]:
    """Split a command line into the table's overrides and each method's.

    A setting goes to the table when the table declares it, else to every method whose config
    has it (`dataset=` / `backbone=` groups to all); one no config has is an error listing the
    valid ones, and `labelled_*` is set by `fractions`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    table: list[str] = []
    routed: dict[str, list[str]] = {method: [] for method in method_keys}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        text, top = override.input_line, override.key_or_group.split(".")[0]
        if top in table_keys:
            table.append(text)
            continue
        if top in LABELLED_KEYS:
            raise ValueError(f"{top} is set per column by fractions=[...] (e.g. fractions=[0.01,0.1,1.0])")
        targets = [m for m, keys in method_keys.items() if top in keys or top in GROUPS]
        if not targets:
            valid = sorted({*table_keys, *GROUPS, *(k for keys in method_keys.values() for k in keys)}
                           - set(LABELLED_KEYS))
            raise ValueError(f"unknown setting '{override.key_or_group}'; valid: {', '.join(valid)}")
        for method in targets:
            routed[method].append(text)
    return table, routed


def compose_configs(overrides: Sequence[str]) -> DictConfig:
    """The table's config with each method's composed config under `configs.<method>`."""
    base_table = compose(f"eval/{NAME}", [])
    bases = {m: compose(f"eval/{m}", []) for m in METHODS}
    table_overrides, _ = route_overrides(overrides, list(base_table), {m: list(c) for m, c in bases.items()})
    table = compose(f"eval/{NAME}", table_overrides)
    methods = [str(m) for m in table.methods]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method(s) {unknown} in methods=; valid: {', '.join(METHODS)}")
    fractions = [float(f) for f in table.fractions]
    bad = [f for f in fractions if not 0.0 < f <= 1.0]
    if bad or not fractions:
        raise ValueError(f"fractions={list(table.fractions)}: each a fraction in (0, 1], e.g. [0.01,0.1,1.0]")
    _, routed = route_overrides(overrides, list(base_table), {m: list(bases[m]) for m in methods})
    configs = {m: compose(f"eval/{m}", routed[m]) for m in methods}
    if "finetune" in methods and any(c.get("pixels") for c in configs.values()):
        raise ValueError("pixels=true has no network to fine-tune: add methods=[knn,linear]")
    ks = [int(k) for k in as_list(configs["knn"].k)] if "knn" in methods else []
    if "knn" in methods and int(table.knn_k) not in ks:
        raise ValueError(f"knn_k={table.knn_k} is not among k={ks}: add it to k=[..]")
    first = configs[methods[0]]
    cfg = OmegaConf.to_container(table, resolve=False)
    cfg.update(checkpoint=first.checkpoint,
               configs={m: OmegaConf.to_container(c, resolve=True) for m, c in configs.items()})
    return OmegaConf.create(cfg)


def headline(method: str, result: dict[str, Any], knn_k: int) -> dict[str, float]:
    """The numbers a table cell shows: k-NN at `knn_k` (first temperature), else top-1 / top-5.

    k-NN scores k beyond the bank's size as k = bank size, so a small labelled bank has its
    `knn_k` column under that k.
    """
    if method == "knn":
        scores = {int(k): v for k, v in result["k"].items()}
        knn_k = min(knn_k, int(result["train_size"]))
        if knn_k not in scores:
            raise ValueError(f"knn_k={knn_k} is not among the evaluated k={sorted(scores)}: add it to k=[..]")
        return {"top1": scores[knn_k]["top1"], "top5": scores[knn_k]["top5"]}
    return {"top1": result["top1"], "top5": result["top5"]}


def fraction_label(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Every method at every fraction; rows for the table and each run's full result."""
    fractions = [float(f) for f in cfg.fractions]
    rows: list[dict[str, Any]] = []
    results: dict[str, dict[str, Any]] = {}
    splits: dict[str, Any] = {}
    described: dict[str, Any] = {}
    methods = [str(m) for m in cfg.methods]
    for method in methods:
        run = method_evaluate(method)
        base = OmegaConf.create(OmegaConf.to_container(cfg.configs[method]))
        # largest first: once the whole split is cached, a smaller subset is read from it
        for fraction in sorted(fractions, reverse=True):
            method_cfg = base.copy()
            method_cfg.labelled_fraction = None if fraction == 1.0 else fraction
            began = time.perf_counter()
            result = run(method_cfg)
            seconds = round(time.perf_counter() - began, 2)
            key = f"{fraction:g}"
            labelled = result.pop("labelled", None)
            if labelled is not None:
                splits.setdefault(key, labelled)
            described.setdefault("evaluated", result.get("evaluated"))
            described.setdefault("dataset", result.get("dataset"))
            described.setdefault("test_size", result.get("test_size"))
            rows.append({"method": method, "fraction": fraction, **headline(method, result, int(cfg.knn_k)),
                         "train_size": result["train_size"], "seconds": seconds})
            results.setdefault(method, {})[key] = result
    rows.sort(key=lambda row: (methods.index(row["method"]), fractions.index(row["fraction"])))
    results = {m: {f"{f:g}": by_fraction[f"{f:g}"] for f in fractions} for m, by_fraction in results.items()}
    return {**described, "fractions": fractions, "methods": methods,
            "knn_k": int(cfg.knn_k), "rows": rows, "splits": splits, "results": results}


def markdown_table(r: dict[str, Any]) -> str:
    """Methods down, fractions across: top-1 / top-5 (%) per cell, train sizes below."""
    fractions = r["fractions"]
    cell = {(row["method"], row["fraction"]): row for row in r["rows"]}
    header = "| method | " + " | ".join(fraction_label(f) for f in fractions) + " |"
    lines = [header, "|---|" + "---|" * len(fractions)]
    for method in r["methods"]:
        title = TITLES[method] + (f" (k={r['knn_k']})" if method == "knn" else "")
        values = [f"{cell[(method, f)]['top1']:.2f} / {cell[(method, f)]['top5']:.2f}" for f in fractions]
        lines.append(f"| {title} | " + " | ".join(values) + " |")
    sizes = ", ".join(
        f"{fraction_label(f)}: {cell[(r['methods'][0], f)]['train_size']}" for f in fractions
    )
    lines += ["", f"top-1 / top-5 (%) on the {r['test_size']} test images of {r['dataset']} "
                  f"({r['evaluated']}); labelled train images: {sizes}."]
    return "\n".join(lines)


def summary(r: dict[str, Any]) -> str:
    return f"label efficiency\n\n{markdown_table(r)}"


def main(argv: list[str] | None = None) -> None:
    """Compose the table's and the methods' configs from the command line, run, write JSON + markdown."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = sys.argv[1:] if argv is None else argv
    try:
        cfg = compose_configs(args)
    except (ValueError, HydraException, OmegaConfBaseException) as error:
        print(f"ssl.eval.{NAME}: error: {error}", file=sys.stderr)
        sys.exit(2)
    results = run_command(NAME, cfg, evaluate, summary)
    path = output_path(cfg, NAME)
    if path is not None:
        table = Path(path).with_suffix(".md")
        table.write_text(markdown_table(results) + "\n")
        print(f"  table: {table}")


if __name__ == "__main__":
    main()
