"""Thin wrapper: `python scripts/export_check.py <checkpoint> [weights=teacher|student]`.

Exports the checkpoint's backbone to a temp dir, reloads it with timm and prints the largest
feature difference (see `ssl.export.compare_with_timm`).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl.export import compare_with_timm  # noqa: E402


def main(argv: list[str]) -> None:
    paths = [a for a in argv if "=" not in a]
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if len(paths) != 1 or set(args) - {"weights"}:
        print("usage: python scripts/export_check.py <checkpoint> [weights=teacher|student]", file=sys.stderr)
        sys.exit(2)
    result = compare_with_timm(paths[0], args.get("weights", "teacher"))
    print(f"{result['weights_source']} backbone, features {result['shape']} on {result['images']}")
    print(f"timm call used:\n{result['timm_call']}")
    print(f"max abs difference: {result['max_abs_diff']:.3g}")


if __name__ == "__main__":
    main(sys.argv[1:])
