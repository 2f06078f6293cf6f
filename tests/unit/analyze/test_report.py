"""Plot titles stay readable: a long checkpoint path is cut to its tail, a short name is kept."""

from __future__ import annotations

from ssl.analyze.report import short_name


def test_long_reference_keeps_its_tail_and_fits() -> None:
    path = "exported backbone runs/grid/mae_mask_ratio/mask_ratio=0.75/backbone.safetensors"
    name = short_name(path)
    assert len(name) == 48 and name.startswith("...")
    assert name.endswith("mask_ratio=0.75/backbone.safetensors")
    assert short_name("raw pixels in [0, 1]") == "raw pixels in [0, 1]"
