"""The notebooks' helpers: checkpoint lookup, module reload, retrieval, t-SNE and figures."""

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from ssl.config import CONFIG_DIR
from ssl.pretrain import build_module
from ssl.visualize.checkpoints import find_checkpoint, load_module, output_dir, reconstruction_pictures
from ssl.visualize.embedding import picture_figure, plot_embedding, tsne_2d
from ssl.visualize.retrieval import nearest_neighbours, retrieval_grid


def test_find_checkpoint_takes_the_path_else_the_newest_run(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="SSL_NOTEBOOK_CHECKPOINT"):
        find_checkpoint(runs=tmp_path)
    paths = []
    for name, objective in (("a", "dino"), ("b", "mae")):
        path = tmp_path / "2026-01-01" / name / "checkpoints" / "last.ckpt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        (path.parent.parent / "config.yaml").write_text(f"objective:\n  {objective}:\n    weight: 1.0\n")
        paths.append(path)
    os.utime(paths[0], (time.time() + 60, time.time() + 60))  # "a" is the newest
    assert find_checkpoint(runs=tmp_path) == paths[0]
    assert find_checkpoint(runs=tmp_path, objectives=["mae", "mfm"]) == paths[1]
    with pytest.raises(FileNotFoundError, match="objective coke"):
        find_checkpoint(runs=tmp_path, objectives=["coke"])
    assert find_checkpoint(str(paths[1]), runs=tmp_path) == paths[1]
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        find_checkpoint(tmp_path / "missing.ckpt")


def test_output_dir_is_created(tmp_path) -> None:
    assert output_dir(tmp_path / "figures") == tmp_path / "figures" and (tmp_path / "figures").is_dir()


def test_load_module_rebuilds_the_objectives_for_reconstructions(tmp_path) -> None:
    overrides = ["objective=mae", "backbone=vit_t", "+backbone.kwargs.depth=1",
                 "objective.mae.decoder_depth=1", "run_dir=/tmp/x"]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    torch.manual_seed(0)
    module = build_module(cfg)
    path = tmp_path / "last.ckpt"
    config = module.hparams["config"]
    torch.save({"hyper_parameters": {"config": config}, "state_dict": module.state_dict()}, path)
    loaded, loaded_config = load_module(path)
    assert not loaded.training and loaded_config["backbone"]["name"] == "vit_tiny_patch16_224"
    for key, value in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    dataset_cfg = OmegaConf.create(loaded_config["dataset"])
    pictures = reconstruction_pictures(loaded, torch.randn(3, 3, 28, 28), dataset_cfg)
    assert list(pictures) == ["mae"] and isinstance(pictures["mae"], Image.Image)
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not written by ssl.pretrain"):
        load_module(tmp_path / "foreign.ckpt")


def test_nearest_neighbours_by_cosine_similarity() -> None:
    torch.manual_seed(0)
    keys, queries = torch.randn(50, 8), torch.randn(4, 8)
    sims, idx = nearest_neighbours(queries, keys * 3, k=5)  # the scale of features does not matter
    brute = F.normalize(queries, dim=1) @ F.normalize(keys, dim=1).T
    expected = brute.sort(dim=1, descending=True)
    torch.testing.assert_close(sims, expected.values[:, :5])
    assert torch.equal(idx, expected.indices[:, :5])
    _, own = nearest_neighbours(keys, keys, k=3, exclude_self=True)
    assert not (own == torch.arange(50)[:, None]).any()


def test_retrieval_grid_has_one_row_per_query() -> None:
    picture = retrieval_grid(torch.rand(2, 3, 28, 28), torch.rand(2, 4, 3, 28, 28), torch.rand(2, 4) > 0.5)
    # 28 px enlarged x4 to 112 px; 5 columns (query + 4), 2 rows, 2 px padding.
    assert picture.size == (5 * 112 + 6 * 2, 2 * 112 + 3 * 2)


def test_tsne_is_reproducible_and_the_figures_save(tmp_path) -> None:
    torch.manual_seed(0)
    centres = torch.randn(3, 16) * 5
    labels = torch.arange(60) % 3
    features = centres[labels] + torch.randn(60, 16)
    points = tsne_2d(features, seed=0, perplexity=10)
    assert points.shape == (60, 2) and np.isfinite(points).all()
    assert np.allclose(points, tsne_2d(features, seed=0, perplexity=10))
    figure = plot_embedding(points, labels, ["a", "b", "c"], title="t-SNE")
    figure.savefig(tmp_path / "embedding.png")
    assert Image.open(tmp_path / "embedding.png").size[0] > 100
    grid = Image.new("RGB", (200, 300))
    picture_figure(grid, ["one", "two", "three"], title="grid").savefig(tmp_path / "grid.png")
    assert (tmp_path / "grid.png").stat().st_size > 0
