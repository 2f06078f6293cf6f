"""Projection / prediction heads owned by objectives."""
