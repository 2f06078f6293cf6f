"""Several degradation analyses of the same sweep as one: their reference encoders side by side.

A reference is measured on its own (its bank, its test features, its sweep), so a checkpoint trained
later, or a reference re-measured, joins an existing analysis without measuring the others again:

    python -m ssl.analyze.degradation objective=mae "analysis.references=[checkpoint]" \\
        checkpoint=runs/b/backbone.safetensors hydra.run.dir=runs/analyze/b
    python -m ssl.analyze.merge runs/analyze/both runs/analyze/a/degradation.json \\
        runs/analyze/b/degradation.json

Only analyses of the same sweep merge: objective, knob, strengths, dataset, test images and sweep
settings must agree (anything else would put curves measured differently on one plot). A later
file's reference of the same name replaces the earlier one, in place.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ssl.analyze.report import markdown_table, plot, write_json

SAME_SWEEP = ("objective", "knob", "strengths", "dataset", "test_size", "settings")


def merge_results(analyses: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The first analysis with every analysis's references (a repeated name: the later one)."""
    if not analyses:
        raise ValueError("nothing to merge: pass at least one degradation.json")
    first = analyses[0]
    for index, other in enumerate(analyses[1:], start=2):
        differing = [key for key in SAME_SWEEP if other.get(key) != first.get(key)]
        if differing:
            details = "; ".join(f"{key}: {first.get(key)!r} vs {other.get(key)!r}" for key in differing)
            raise ValueError(f"analysis {index} is not the same sweep as analysis 1 ({details})")
    references: dict[str, dict[str, Any]] = {}
    for analysis in analyses:
        for reference in analysis["references"]:
            references[reference["reference"]] = reference
    merged = {key: value for key, value in first.items() if key != "config"}
    merged["references"] = list(references.values())
    merged["merged_from"] = [analysis.get("config") for analysis in analyses]
    return merged


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ssl.analyze.merge", description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path, help="where degradation.{json,md,png} of the merge go")
    parser.add_argument("analyses", type=Path, nargs="+", help="degradation.json files of one sweep")
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.analyses if not path.is_file()]
    if missing:
        print(f"ssl.analyze.merge: error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    try:
        merged = merge_results([json.loads(path.read_text()) for path in args.analyses])
    except ValueError as error:
        print(f"ssl.analyze.merge: error: {error}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_json(args.out_dir / "degradation.json", merged)
    (args.out_dir / "degradation.md").write_text(markdown_table(merged))
    plot(args.out_dir / "degradation.png", merged)
    names = ", ".join(reference["reference"] for reference in merged["references"])
    print(f"merged {len(args.analyses)} analyses ({names})")
    print(f"  results: {args.out_dir}/degradation.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
