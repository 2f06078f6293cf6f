"""Analyses of one sweep merge into one (references side by side); different sweeps are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl.analyze.merge import main, merge_results


def analysis(*names: str, strengths: tuple[float, ...] = (0.5, 0.75), knn: float = 50.0) -> dict:
    clean = {"knn_top1": knn, "linear_top1": knn, "cos_same_class": 0.8, "cos_different_class": 0.5,
             "chance_top1": 10.0, "label_entropy_bits": 3.32}
    rows = [{"strength": s, "knn_top1": knn * (1 - s), "knn_agreement": 50.0, "knn_mi_bits": 1.0,
             "cos_clean_degraded": 1 - s, "cos_two_degradations": 1 - s / 2} for s in strengths]
    return {"objective": "mae", "knob": "mask_ratio", "description": "", "default": 0.75,
            "strengths": list(strengths), "dataset": "fashion_mnist", "test_size": 100,
            "knobs": ["mask_ratio"], "settings": {"k": 20, "seed": 0}, "config": {"names": list(names)},
            "references": [{"reference": n, "clean": dict(clean), "rows": [dict(r) for r in rows]}
                           for n in names]}


def test_references_join_and_a_repeated_one_is_replaced_in_place() -> None:
    merged = merge_results([analysis("raw pixels", "vit untrained"), analysis("vit untrained", knn=70.0),
                            analysis("checkpoint")])
    assert [r["reference"] for r in merged["references"]] == ["raw pixels", "vit untrained", "checkpoint"]
    assert merged["references"][1]["clean"]["knn_top1"] == 70.0  # the later measurement
    assert merged["references"][0]["clean"]["knn_top1"] == 50.0
    assert len(merged["merged_from"]) == 3 and "config" not in merged


def test_different_sweeps_are_refused_naming_what_differs() -> None:
    with pytest.raises(ValueError, match="strengths"):
        merge_results([analysis("a"), analysis("b", strengths=(0.5, 0.9))])
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results([])


def test_command_writes_json_markdown_and_plot(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps(analysis("raw pixels")))
    second.write_text(json.dumps(analysis("vit untrained")))
    assert main([str(tmp_path / "out"), str(first), str(second)]) == 0
    written = json.loads((tmp_path / "out" / "degradation.json").read_text())
    assert [r["reference"] for r in written["references"]] == ["raw pixels", "vit untrained"]
    assert "## vit untrained" in (tmp_path / "out" / "degradation.md").read_text()
    assert (tmp_path / "out" / "degradation.png").stat().st_size > 0
    assert main([str(tmp_path / "out2"), str(tmp_path / "missing.json")]) == 2
    assert "no such file" in capsys.readouterr().err
