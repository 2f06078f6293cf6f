"""Errors every layer raises for a configuration that cannot run (one class, so entry points catch one)."""

from __future__ import annotations


class IncompatibleConfigError(ValueError):
    """An objective cannot run with the chosen backbone or settings (raised before training)."""
