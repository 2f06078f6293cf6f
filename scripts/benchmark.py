"""Thin wrapper: `python scripts/benchmark.py objective=dino backbone=vit_t` (see ssl/benchmark.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ssl.benchmark import main  # noqa: E402

if __name__ == "__main__":
    main()
