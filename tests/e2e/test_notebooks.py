"""The notebooks: committed without outputs, and each runs headless on a tiny real checkpoint."""

import os
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from conftest import FASHION_MNIST_DIR, REPO_ROOT
from PIL import Image

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
# notebook -> (the tiny run it reads, the figures it must save)
NOTEBOOKS = {
    "attention_maps": ("dino", ["attention_maps.png"]),
    "reconstructions": ("mae", ["reconstructions_mae.png"]),
    "knn_retrieval": ("dino", ["knn_retrieval.png"]),
    "embedding_2d": ("dino", ["embedding_2d.png"]),
    "degradation": ("mae", [f"degradation_{o}.png" for o in ("mae", "data2vec", "mfm", "dino", "coke")]),
}
needs_data = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="needs apt-get install dataset-fashion-mnist"
)

TINY = [
    "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.dino.out_dim=256",
    "objective.dino.hidden_dim=128", "objective.dino.local_crops=2", "data.batch_size=16",
    "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.max_epochs=2",
    "knn.enabled=false", "export.enabled=false", "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1",
]
MASKED_TINY = [
    "objective=mae", "backbone=vit_t", "+backbone.kwargs.depth=2", "objective.mae.decoder_depth=1",
    "data.batch_size=16", "data.num_workers=0", "trainer.limit_train_batches=3", "trainer.max_epochs=1",
    "knn.enabled=false", "export.enabled=false", "trainer.enable_model_summary=false",
    "trainer.log_every_n_steps=1", "reconstructions.num_images=4",
]
# Small enough for 2 CPU cores: a few images, 2000 train images searched, 400 points in the t-SNE.
# The degradation notebook: 200 test images, linear probe off, a 1-block untrained ViT.
NOTEBOOK_ENV = {"SSL_NOTEBOOK_IMAGES": "4", "SSL_NOTEBOOK_MAX_TRAIN": "2000", "SSL_NOTEBOOK_POINTS": "400",
                "SSL_NOTEBOOK_SAMPLES": "200",
                "SSL_NOTEBOOK_OVERRIDES": "analysis.linear=false +backbone.kwargs.depth=1 num_workers=0"}


def pretrain(args: list[str], run_dir: Path) -> Path:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", "ssl.pretrain", *args, f"hydra.run.dir={run_dir}"],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny real pretraining per objective the notebooks need: DINO and MAE on Fashion-MNIST."""
    root = tmp_path_factory.mktemp("notebook-runs")
    return {"dino": pretrain(TINY, root / "dino"), "mae": pretrain(MASKED_TINY, root / "mae")}


def test_notebooks_are_committed_without_outputs() -> None:
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert "SSL_NOTEBOOK_CHECKPOINT" in code[0].source, f"{name}: the parameters come first"
        for cell in code:
            assert cell.outputs == [] and cell.execution_count is None, f"{name} is committed with outputs"


@pytest.mark.slow
@needs_data
def test_training_callbacks_drew_attention_maps(runs: dict[str, Path]) -> None:
    """prepare() wires the attention callback for ViTs: every epoch, teacher (DINO) or student (MAE)."""
    drawn = sorted(p.name for p in (runs["dino"] / "attention").glob("*.png"))
    assert drawn == ["epoch000.png", "epoch001.png"]
    assert (runs["mae"] / "attention" / "epoch000.png").is_file()
    # 4 columns; rows: image + 3 heads (ViT-Tiny) + masks; 28 px enlarged x4 to 112 px, 2 px padding.
    assert Image.open(runs["dino"] / "attention" / "epoch001.png").size == (4 * 112 + 5 * 2, 5 * 112 + 6 * 2)


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("name", list(NOTEBOOKS))
def test_notebook_runs_headless_and_saves_its_figures(
    name: str, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run, figures = NOTEBOOKS[name]
    output = tmp_path / "figures"
    # The kernel inherits this process's environment.
    monkeypatch.setenv("SSL_NOTEBOOK_CHECKPOINT", str(runs[run] / "checkpoints" / "last.ckpt"))
    monkeypatch.setenv("SSL_NOTEBOOK_OUTPUT", str(output))
    for key, value in NOTEBOOK_ENV.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, when a cell fails
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert not errors
    for figure in figures:
        with Image.open(output / figure) as picture:
            assert picture.format == "PNG" and min(picture.size) > 100, figure
