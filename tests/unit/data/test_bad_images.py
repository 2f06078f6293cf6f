"""Bad data in `dataset=imagefolder` (issue 8): odd modes are converted; empty, truncated, corrupt
and non-image files are skipped and counted, never crash a worker; a folder with nothing usable
fails before training with one message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image, ImageFile

from ssl.callbacks.skipped_images import SkippedImages
from ssl.data.datamodule import PretrainDataModule, clean_loader, evenly_spaced_images
from ssl.data.datasets import DatasetNotFoundError, ImageFolderDataset, UnreadableImageError, load_image
from ssl.data.masking import RandomTokenMasker
from ssl.data.spec import ViewSpec

REPO_ROOT = Path(__file__).resolve().parents[3]
DATASET = OmegaConf.create({
    "name": "imagefolder", "image_size": 16, "local_crop_size": 8, "global_crop_scale": [0.4, 1.0],
    "local_crop_scale": [0.05, 0.4], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
})
COLOUR = (200, 100, 50)
# file name -> (image, the RGB pixel it must load as, tolerance)
GOOD = {
    "rgb.png": (lambda: Image.new("RGB", (24, 20), COLOUR), COLOUR, 0),
    "rgba.png": (lambda: Image.new("RGBA", (24, 20), (*COLOUR, 128)), COLOUR, 0),
    "palette.png": (lambda: _palette(), COLOUR, 0),
    "palette_transparent.png": (lambda: _palette(transparent=True), COLOUR, 0),
    "cmyk.jpg": (lambda: Image.new("RGB", (24, 20), COLOUR).convert("CMYK"), COLOUR, 6),
    "grey16.png": (lambda: Image.fromarray(np.full((20, 24), 32896, np.uint16)), (128,) * 3, 0),
    "grey16.tif": (lambda: Image.fromarray(np.full((20, 24), 65535, np.uint16)), (255,) * 3, 0),
    "grey.png": (lambda: Image.new("L", (24, 20), 128), (128,) * 3, 0),
    "grey_alpha.png": (lambda: Image.new("LA", (24, 20), (128, 255)), (128,) * 3, 0),
    "bilevel.png": (lambda: Image.new("1", (24, 20), 1), (255,) * 3, 0),
}
EXTRA_GOOD = 2  # plain RGB images, so that 16 files make whole batches of 4 and 8
# file name -> what the skip report says about it
BROKEN = {
    "zero_bytes.png": "empty file (0 bytes)",
    "truncated.jpg": "Truncated File Read",
    "text.jpg": "cannot identify image file",
    "random_bytes.png": "cannot identify image file",
}
NOT_IMAGES = ("notes.txt", ".DS_Store", "labels.csv")


def _palette(transparent: bool = False) -> Image.Image:
    image = Image.new("RGB", (24, 20), COLOUR).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    if transparent:
        image.info["transparency"] = 3  # an unused palette entry is transparent; the pixels are opaque
    return image


def write_broken(directory: Path, prefix: str = "") -> list[Path]:
    """One file of each broken kind; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {name: directory / f"{prefix}{name}" for name in BROKEN}
    paths["zero_bytes.png"].write_bytes(b"")
    Image.new("RGB", (64, 64), COLOUR).save(directory / "whole.jpg", quality=90)
    data = (directory / "whole.jpg").read_bytes()
    (directory / "whole.jpg").unlink()
    paths["truncated.jpg"].write_bytes(data[: len(data) // 2])  # a real JPEG cut in half
    paths["text.jpg"].write_text("this is a text file with an image extension\n")
    paths["random_bytes.png"].write_bytes(np.random.default_rng(0).integers(0, 256, 600, np.uint8).tobytes())
    return list(paths.values())


def write_folder(directory: Path) -> tuple[list[Path], list[Path]]:
    """Good images of every mode, the broken files and some non-image files; (good, broken)."""
    directory.mkdir(parents=True, exist_ok=True)
    good = []
    for name, (make, _, _) in GOOD.items():
        make().save(directory / name)
        good.append(directory / name)
    for i in range(EXTRA_GOOD):
        Image.new("RGB", (24, 20), COLOUR).save(directory / f"extra{i}.png")
        good.append(directory / f"extra{i}.png")
    for name in NOT_IMAGES:
        (directory / name).write_text("not an image")
    return good, write_broken(directory)


@pytest.fixture
def folder(tmp_path: Path) -> tuple[Path, list[Path], list[Path]]:
    good, broken = write_folder(tmp_path / "images")
    return tmp_path / "images", good, broken


def test_truncated_images_are_not_loaded_half_grey() -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # a truncated file is broken, not padded


@pytest.mark.parametrize("name", list(GOOD))
def test_every_mode_loads_as_rgb_with_its_colour(tmp_path: Path, name: str) -> None:
    make, expected, tolerance = GOOD[name]
    make().save(tmp_path / name)
    image = load_image(str(tmp_path / name))
    assert image.mode == "RGB" and image.size == (24, 20)
    pixels = np.asarray(image).reshape(-1, 3).astype(int)
    assert np.abs(pixels - np.array(expected)).max() <= tolerance, (name, pixels[0])


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_broken_file_is_unreadable_with_its_reason(tmp_path: Path, name: str) -> None:
    path = next(p for p in write_broken(tmp_path) if p.name == name)
    with pytest.raises(UnreadableImageError) as info:
        load_image(str(path))
    assert info.value.path == str(path) and BROKEN[name] in info.value.reason


def test_non_image_files_are_not_listed_broken_ones_are(folder) -> None:
    root, good, broken = folder
    ds = ImageFolderDataset(str(root))
    listed = {Path(p).name for p, _ in ds.samples}
    assert listed == {p.name for p in good + broken}
    assert not listed & set(NOT_IMAGES)
    assert len(ds) == 16


def test_training_loader_with_two_workers_skips_and_counts(folder) -> None:
    root, good, broken = folder
    ds = ImageFolderDataset(str(root))
    masker = RandomTokenMasker(16, 0.75, prefix="mae")
    data = PretrainDataModule(DATASET, ViewSpec(plain_crops=1), batch_size=4, num_workers=2,
                              dataset=ds, maskers=[masker])
    reported, seen = [], []
    for batch in data.train_dataloader():
        # A broken file's slot holds the next readable image: batches keep their size.
        assert batch["plain_views"][0].shape == (4, 3, 16, 16) and batch["mae_mask"].shape == (4, 16)
        reported += batch["unreadable"]
        seen += [ds.samples[i][0] for i in batch["index"].tolist()]
    assert sorted(path for path, _ in reported) == sorted(map(str, broken))  # each once per epoch
    assert {Path(p) for p in seen} <= set(good)  # only readable images were trained on
    assert all(BROKEN[Path(path).name] in reason for path, reason in reported)


def test_epoch_report_names_the_count_and_the_first_file(folder, capsys) -> None:
    root, _, broken = folder
    ds = ImageFolderDataset(str(root))
    data = PretrainDataModule(DATASET, ViewSpec(plain_crops=1), batch_size=8, num_workers=2, dataset=ds)
    logged: dict[str, float] = {}
    module = SimpleNamespace(device="cpu", log=lambda name, value, **_: logged.__setitem__(name, value))
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce=lambda t, reduce_op: t), is_global_zero=True, current_epoch=0
    )
    callback = SkippedImages()
    callback.on_train_epoch_start(trainer, module)
    for i, batch in enumerate(data.train_dataloader()):
        callback.on_train_batch_end(trainer, module, None, batch, i)
    callback.on_train_epoch_end(trainer, module)
    message = capsys.readouterr().err
    assert logged == {"train/skipped_images": 4.0} and callback.last_total == 4
    assert "warning: epoch 0: skipped 4 unreadable images (first: " in message
    assert any(f"first: {p}: " in message for p in map(str, broken))
    callback.on_train_epoch_start(trainer, module)  # a clean epoch: counted as 0, nothing printed
    callback.on_train_epoch_end(trainer, module)
    assert logged == {"train/skipped_images": 0.0} and capsys.readouterr().err == ""


def test_evaluation_loader_drops_bad_files_and_keeps_labels_aligned(tmp_path: Path) -> None:
    root = tmp_path / "labelled"
    for name in ("cat", "dog"):
        write_broken(root / name, prefix="a_")  # sorted first: some batches hold only broken files
        for i in range(3):
            Image.new("RGB", (24, 20), (40 + 100 * (name == "dog"),) * 3).save(root / name / f"{i}.png")
    ds = ImageFolderDataset(str(root))
    assert ds.has_labels and len(ds) == 14
    loader = clean_loader(ds, DATASET, batch_size=2, num_workers=2)
    labels, indices, skipped = [], [], 0
    for batch in loader:  # the all-broken batches are left out
        assert len(batch["index"]) > 0
        labels += batch["label"].tolist()
        indices += batch["index"].tolist()
        skipped += len(batch["unreadable"])
        assert batch["image"].shape[1:] == (3, 16, 16)
    assert labels == [ds.samples[i][1] for i in indices] == [0, 0, 0, 1, 1, 1]
    brightness = [float(ds[i][0].getpixel((0, 0))[0]) for i in indices]
    assert brightness == [40.0] * 3 + [140.0] * 3  # each feature row is its label's image
    # Batches of 2 over cat/a_*4, cat/0-2, dog/a_*4, dog/0-2: three hold only broken files and are
    # left out whole; the two mixed ones report their broken file.
    assert skipped == 2


def test_dino_linear_protocol_trains_and_tests_over_broken_files(tmp_path: Path) -> None:
    from ssl.eval.augmented_linear_probe import dino_linear_protocol

    root = tmp_path / "labelled"
    for c, name in enumerate(("cat", "dog")):
        write_broken(root / name)
        for i in range(3):
            Image.new("RGB", (24, 20), (40 + 100 * c,) * 3).save(root / name / f"{i}.png")
    ds = ImageFolderDataset(str(root))
    result = dino_linear_protocol(lambda x: x.mean(dim=(2, 3)), ds, ds, DATASET, 2, epochs=1,
                                  batch_size=4, num_workers=2)
    assert 0.0 <= result["top1"] <= 100.0


def test_callback_images_skip_broken_files(folder) -> None:
    root, _, _ = folder
    images, labels = evenly_spaced_images(ImageFolderDataset(str(root)), DATASET, 16)
    assert images.shape == (16, 3, 16, 16) and labels.tolist() == [-1] * 16


def test_folder_where_nothing_decodes_fails_when_built(tmp_path: Path) -> None:
    broken = write_broken(tmp_path / "broken")
    with pytest.raises(DatasetNotFoundError) as info:
        ImageFolderDataset(str(tmp_path / "broken"))
    message = str(info.value)
    assert f"None of the {len(broken)} image files under {tmp_path / 'broken'} can be decoded" in message


# --------------------------------------------------------------------------------------------
# Through `python -m ssl.pretrain`
# --------------------------------------------------------------------------------------------

TINY = [
    "experiment=quickstart", "dataset=imagefolder", "dataset.image_size=16", "dataset.local_crop_size=8",
    "dataset.patch_size=8", "backbone.kwargs.depth=1", "objective.dino.out_dim=64",
    "objective.dino.hidden_dim=32", "objective.dino.bottleneck_dim=16", "objective.dino.local_crops=1",
    "data.batch_size=8", "data.num_workers=2", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
    "knn.enabled=false", "reconstructions.enabled=false", "attention_maps.enabled=true",
    "attention_maps.num_images=4", "export.enabled=false", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]


def pretrain(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "ssl.pretrain", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=env)


def test_pretraining_run_skips_broken_files_and_reports_them(folder, tmp_path: Path) -> None:
    root, _, broken = folder
    out = pretrain([*TINY, f"dataset.root={root}", f"hydra.run.dir={tmp_path}/run"])
    assert out.returncode == 0, out.stderr[-4000:]
    assert "warning: epoch 0: skipped 4 unreadable images (first: " in out.stderr
    metrics = (tmp_path / "run" / "logs" / "metrics.csv").read_text().splitlines()
    column = metrics[0].split(",").index("train/skipped_images")
    assert [float(row.split(",")[column]) for row in metrics[1:] if row.split(",")[column]] == [4.0]
    assert (tmp_path / "run" / "attention").is_dir()  # the picture callback got past the broken files


@pytest.mark.parametrize(("make", "message"), [
    (lambda d: None, "does not exist (or is not a directory)"),
    (lambda d: [d.mkdir(), (d / "empty_class").mkdir(), (d / "notes.txt").write_text("x")],
     "No images were found under"),
    (lambda d: write_broken(d), "can be decoded"),
], ids=["missing", "only_non_images", "only_broken"])
def test_unusable_folder_fails_before_training(tmp_path: Path, make, message: str) -> None:
    make(tmp_path / "data")
    out = pretrain([*TINY, f"dataset.root={tmp_path / 'data'}", f"hydra.run.dir={tmp_path}/run"])
    assert out.returncode == 2, out.stderr[-3000:]
    assert "ssl.pretrain: error: " in out.stderr and message in out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "config.yaml").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()
