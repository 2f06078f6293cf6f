"""Optimisation: per-step schedules, parameter groups, gradient clipping, optimizer factory."""
