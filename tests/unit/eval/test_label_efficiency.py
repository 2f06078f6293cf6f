"""`ssl.eval.label_efficiency`: one command line routed to k-NN, linear and fine-tuning, and the
table of all three at each fraction of labels (JSON + markdown)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_labelled_eval import image_folder

from ssl.eval import label_efficiency


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: a second thread only adds hand-off cost, and much more when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Overrides for 20 train / 5 test generated images per class (3 classes) of 8 px."""
    root = tmp_path_factory.mktemp("label_efficiency")
    image_folder(root / "train", 20)
    image_folder(root / "test", 5, offset=100)
    return ["dataset=imagefolder", f"dataset.root={root / 'train'}", f"dataset.test_root={root / 'test'}",
            "dataset.image_size=8", "dataset.patch_size=4", "num_workers=0", "device=cpu"]


def test_overrides_go_to_the_methods_that_declare_them(folders: list[str]) -> None:
    cfg = label_efficiency.compose_configs([
        *folders, "backbone=vit_t", "k=[5,20]", "probe.epochs=3", "finetune.epochs=2", "seed=4",
        "fractions=[0.5,1.0]", "methods=[knn,linear,finetune]",
    ])
    knn, linear, tuned = cfg.configs.knn, cfg.configs.linear, cfg.configs.finetune
    assert list(cfg.fractions) == [0.5, 1.0] and "fractions" not in knn
    assert list(knn.k) == [5, 20] and "k" not in linear and "k" not in tuned
    assert linear.probe.epochs == 3 and "probe" not in knn and tuned.finetune.epochs == 2
    assert knn.seed == linear.seed == tuned.seed == 4
    assert knn.dataset.image_size == tuned.dataset.image_size == 8
    assert knn.backbone.name == tuned.backbone.name == "vit_tiny_patch16_224"


def test_unknown_and_per_column_settings_are_refused(folders: list[str], capsys) -> None:
    with pytest.raises(ValueError, match="unknown setting 'bogus'; valid: .*finetune.*fractions.*probe"):
        label_efficiency.compose_configs([*folders, "bogus=1"])
    with pytest.raises(ValueError, match="set per column by fractions"):
        label_efficiency.compose_configs([*folders, "labelled_fraction=0.1"])
    with pytest.raises(ValueError, match="knn_k=7 is not among k=\\[20\\]"):
        label_efficiency.compose_configs([*folders, "pixels=true", "methods=[knn]", "k=[20]", "knn_k=7"])
    with pytest.raises(SystemExit) as exit_info:
        label_efficiency.main([*folders, "pixels=true", "methods=[knn,bogus]"])
    assert exit_info.value.code == 2 and "valid: knn, linear, finetune" in capsys.readouterr().err


def test_table_of_every_method_at_every_fraction(folders: list[str], tmp_path: Path) -> None:
    output = tmp_path / "table.json"
    label_efficiency.main([
        *folders, "backbone=vit_t", "+backbone.kwargs.depth=1", "fractions=[0.1,1.0]",
        f"cache_dir={tmp_path / 'cache'}", f"output={output}", "probe.epochs=2", "probe.lrs=[0.1]",
        "probe.feature_variants=[cls]", "finetune.epochs=1", "finetune.batch_size=8",
        "finetune.augment.rand_augment=null",
    ])
    result = json.loads(output.read_text())
    cells = {(row["method"], row["fraction"]): row for row in result["rows"]}
    assert set(cells) == {(m, f) for m in ("knn", "linear", "finetune") for f in (0.1, 1.0)}
    assert {cells[(m, 0.1)]["train_size"] for m in ("knn", "linear", "finetune")} == {6}  # 2 per class
    assert {cells[(m, 1.0)]["train_size"] for m in ("knn", "linear", "finetune")} == {60}
    assert all(0.0 <= row["top1"] <= row["top5"] <= 100.0 for row in result["rows"])
    assert result["test_size"] == 15
    assert result["splits"]["0.1"]["per_class_counts"] == {"0": 2, "1": 2, "2": 2}
    assert result["results"]["finetune"]["1"]["epochs"] == 1
    # Features come from the cache after the first k-NN column.
    assert set(result["results"]["linear"]["0.1"]["cache"].values()) == {"hit"}
    table = output.with_suffix(".md").read_text().splitlines()
    assert table[0] == "| method | 10% | 100% |"
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| k-NN (k=20)", "| linear", "| fine-tune"]
    assert "labelled train images: 10%: 6, 100%: 60" in table[-1]
