"""Checkpoint files: atomic writes, finding the newest one, deciding when a run can resume."""
