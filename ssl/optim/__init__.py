"""Optimisation: per-step schedules and the lr schedule choice (schedules.py), parameter groups and
the optimizer (factory.py, lars.py), gradient clipping, the non-finite guard (nonfinite.py) and
whether a step is applied (step_gate.py)."""
