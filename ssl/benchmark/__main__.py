"""`python -m ssl.benchmark ...` (see ssl/benchmark/__init__.py)."""

from ssl.benchmark.cli import main

main()
