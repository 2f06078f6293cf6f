"""Dataset building: idx parsing, image folders, error messages; never touches the network."""

from __future__ import annotations

import gzip
import os
import socket
import struct
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from torch.utils.data import Subset

from ssl.data import datasets as D
from ssl.data.datasets import (
    DatasetNotFoundError,
    ImageFolderDataset,
    build_dataset,
    has_labels,
    read_idx,
    to_rgb,
)

REPO = Path(__file__).resolve().parents[3]
SYSTEM_FMNIST = Path(D.FASHION_MNIST_SYSTEM_DIR)


def dataset_cfg(name: str, **overrides: object):
    """The repository's dataset config with overrides, as Hydra would compose it."""
    cfg = OmegaConf.load(REPO / "conf" / "dataset" / f"{name}.yaml")
    return OmegaConf.merge(cfg, overrides)


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if compress else data)


def write_fmnist(
    directory: Path, n_train: int = 7, n_test: int = 3, compress: bool = True, dotted: bool = False
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A tiny Fashion-MNIST in idx format; returns the arrays written per stem."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for stem, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        sep = "." if dotted else "-"
        ext = ".gz" if compress else ""
        write_idx(directory / f"{stem}-images{sep}idx3-ubyte{ext}", images, compress)
        write_idx(directory / f"{stem}-labels{sep}idx1-ubyte{ext}", labels, compress)
        written[stem] = (images, labels)
    return written


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------


def test_fashion_mnist_from_root_gzip(tmp_path: Path) -> None:
    written = write_fmnist(tmp_path)
    cfg = dataset_cfg("fashion_mnist", root=str(tmp_path))
    for split, stem in (("pretrain", "train"), ("train", "train"), ("test", "t10k")):
        ds = build_dataset(cfg, split)
        images, labels = written[stem]
        assert len(ds) == len(images)
        assert ds.has_labels and has_labels(ds) and ds.num_classes == 10
        for i in range(len(ds)):
            image, label = ds[i]
            assert isinstance(image, Image.Image) and image.mode == "RGB"
            assert image.size == (28, 28)
            assert type(label) is int and label == labels[i]
            pixels = np.asarray(image)
            for c in range(3):
                np.testing.assert_array_equal(pixels[..., c], images[i])


@pytest.mark.parametrize("compress, dotted", [(False, False), (True, True), (False, True)])
def test_fashion_mnist_file_name_variants(tmp_path: Path, compress: bool, dotted: bool) -> None:
    written = write_fmnist(tmp_path, compress=compress, dotted=dotted)
    ds = build_dataset(dataset_cfg("fashion_mnist", root=str(tmp_path)), "test")
    assert len(ds) == 3
    np.testing.assert_array_equal(np.asarray(ds[2][0])[..., 0], written["t10k"][0][2])


def test_fashion_mnist_torchvision_layout(tmp_path: Path) -> None:
    write_fmnist(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert len(build_dataset(dataset_cfg("fashion_mnist", root=str(tmp_path)), "train")) == 7


def test_fashion_mnist_missing_root_says_how_to_get_it(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(dataset_cfg("fashion_mnist", root=str(missing)), "train")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "dataset.root" in message and "dataset.download=true" in message
    assert str(missing) in message and "train-images-idx3-ubyte" in message


def no_network(*args, **kwargs) -> None:
    raise AssertionError("a test tried to open a network connection")


def test_fashion_mnist_downloads_only_when_asked(tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []

    def fake_download(root: str) -> None:  # stands in for torchvision (no network in tests)
        calls.append(root)
        write_fmnist(Path(root) / "FashionMNIST" / "raw")

    monkeypatch.setattr(D, "_download_fashion_mnist", fake_download)
    # download=True below must reach the fake, never the network: any connection attempt fails here
    monkeypatch.setattr(socket.socket, "connect", no_network)
    root = tmp_path / "dl"
    with pytest.raises(DatasetNotFoundError):
        build_dataset(dataset_cfg("fashion_mnist", root=str(root)), "train")
    assert calls == []
    ds = build_dataset(dataset_cfg("fashion_mnist", root=str(root), download=True), "test")
    assert calls == [str(root)] and len(ds) == 3
    build_dataset(dataset_cfg("fashion_mnist", root=str(root), download=True), "train")
    assert len(calls) == 1  # present now: no second download


@pytest.mark.skipif(
    not (SYSTEM_FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="Debian package dataset-fashion-mnist is not installed",
)
def test_fashion_mnist_debian_package() -> None:
    cfg = dataset_cfg("fashion_mnist")  # root: null -> the system directory
    train, test = build_dataset(cfg, "train"), build_dataset(cfg, "test")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert sorted(np.unique(test.targets).tolist()) == list(range(10))
    image, label = test[0]
    assert image.mode == "RGB" and image.size == (28, 28) and 0 <= label < 10


def test_read_idx_rejects_garbage(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx3-ubyte"
    bad.write_bytes(b"\x12\x34\x56\x78" + bytes(16))
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(str(bad))
    short = tmp_path / "short-idx1-ubyte"
    short.write_bytes(idx_bytes(np.zeros(5, np.uint8))[:-1])
    with pytest.raises(ValueError, match="payload"):
        read_idx(str(short))


# --------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------

MODES = ("L", "P", "RGBA", "RGB", "I;16")


def make_image(mode: str, size: tuple[int, int] = (10, 8)) -> Image.Image:
    w, h = size
    ramp = np.linspace(0, 1, w * h).reshape(h, w)
    if mode == "I;16":
        return Image.fromarray((ramp * 65535).astype(np.uint16))  # 16-bit grayscale
    if mode == "L":
        return Image.fromarray((ramp * 255).astype(np.uint8))
    rgba = np.stack([ramp * 255, 255 - ramp * 255, np.full_like(ramp, 100), np.full_like(ramp, 200)], -1)
    image = Image.fromarray(rgba.astype(np.uint8), mode="RGBA")
    if mode == "P":
        return image.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return image.convert(mode)


def populate(directory: Path, modes: tuple[str, ...] = MODES, prefix: str = "img") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, mode in enumerate(modes):
        path = directory / f"{prefix}{i}_{mode.replace(';', '')}.png"
        make_image(mode).save(path)
        paths.append(path)
    return paths


def check_items(ds: ImageFolderDataset) -> None:
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (10, 8)
        assert type(label) is int


def test_imagefolder_labelled(tmp_path: Path) -> None:
    root = tmp_path / "train"
    populate(root / "dog")
    populate(root / "cat", modes=("RGB", "L"))
    populate(root / "cat" / "nested", modes=("P",))  # class folders are searched recursively
    make_image("CMYK").save(root / "cat" / "print.JPG")  # CMYK JPEG, upper-case extension
    (root / "cat" / "notes.txt").write_text("not an image")
    populate(root / "cat", modes=("RGB",), prefix=".hidden")
    ds = build_dataset(dataset_cfg("imagefolder", root=str(root)), "train")
    assert isinstance(ds, ImageFolderDataset)
    assert ds.classes == ["cat", "dog"] and ds.has_labels and ds.num_classes == 2
    assert len(ds) == 4 + len(MODES)
    assert sorted(ds.targets) == [0] * 4 + [1] * len(MODES)
    check_items(ds)
    assert all(isinstance(p, str) and os.path.isfile(p) for p, _ in ds.samples)


def test_imagefolder_unlabeled_flat_and_mixed(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    populate(flat)
    ds = build_dataset(dataset_cfg("imagefolder", root=str(flat)), "pretrain")
    assert len(ds) == len(MODES) and not ds.has_labels and not has_labels(ds)
    assert ds.num_classes is None and {label for _, label in ds.samples} == {-1}
    check_items(ds)

    mixed = tmp_path / "mixed"
    populate(mixed, modes=("RGB",))
    populate(mixed / "sub", modes=("L", "P"))
    populate(mixed / "sub" / "deeper", modes=("RGBA",))
    ds = ImageFolderDataset(str(mixed))
    assert len(ds) == 4 and not ds.has_labels and ds.targets == [-1] * 4
    check_items(ds)


def test_sixteen_bit_images_are_rescaled_not_clipped(tmp_path: Path) -> None:
    populate(tmp_path, modes=("I;16",))
    image, _ = ImageFolderDataset(str(tmp_path))[0]
    gray = np.asarray(image)[..., 0].astype(int)
    assert gray.min() == 0 and gray.max() == 255
    assert 100 < gray.mean() < 155  # a linear ramp stays mid-grey on average


def test_to_rgb_handles_integer_and_float_modes() -> None:
    ramp = np.linspace(0, 1, 12).reshape(3, 4)
    as_int = to_rgb(Image.fromarray((ramp * 65535).astype(np.int32)))
    as_float = to_rgb(Image.fromarray(ramp.astype(np.float32)))
    for image in (as_int, as_float):
        assert image.mode == "RGB"
        assert np.asarray(image).min() == 0 and np.asarray(image).max() == 255


def test_imagefolder_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(dataset_cfg("imagefolder", root=str(empty)), "pretrain")
    message = str(info.value)
    assert "No images were found" in message and str(empty) in message
    for ext in ("jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"):
        assert ext in message
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        build_dataset(dataset_cfg("imagefolder", root=str(tmp_path / "missing")), "train")
    with pytest.raises(DatasetNotFoundError, match="dataset.root"):
        build_dataset(dataset_cfg("imagefolder"), "train")  # root: ??? in the config


def test_imagefolder_test_split(tmp_path: Path) -> None:
    populate(tmp_path / "train" / "a", modes=("RGB",))
    populate(tmp_path / "train" / "b", modes=("RGB",))
    populate(tmp_path / "train" / "c", modes=("RGB",))
    populate(tmp_path / "test" / "c", modes=("L", "RGB"))
    with pytest.raises(DatasetNotFoundError, match="test_root"):
        build_dataset(dataset_cfg("imagefolder", root=str(tmp_path / "train")), "test")
    cfg = dataset_cfg("imagefolder", root=str(tmp_path / "train"), test_root=str(tmp_path / "test"))
    test = build_dataset(cfg, "test")
    # Labels follow the train folder's classes even though the test folder only has "c".
    assert test.classes == ["a", "b", "c"] and test.targets == [2, 2] and test.num_classes == 3
    populate(tmp_path / "test" / "zebra", modes=("RGB",))
    with pytest.raises(ValueError, match="zebra"):
        build_dataset(cfg, "test")


def test_imagenet_layout(tmp_path: Path) -> None:
    for wnid in ("n01", "n02"):
        populate(tmp_path / "train" / wnid, modes=("RGB", "L"))
        populate(tmp_path / "val" / wnid, modes=("RGB",))
    cfg = dataset_cfg("imagenet", root=str(tmp_path))
    assert len(build_dataset(cfg, "pretrain")) == 4
    val = build_dataset(cfg, "test")
    assert len(val) == 2 and val.targets == [0, 1] and val.has_labels
    flat = tmp_path / "flat"
    populate(flat / "train" / "n01", modes=("RGB",))
    populate(flat / "val", modes=("RGB",))
    with pytest.raises(DatasetNotFoundError, match="class"):
        build_dataset(dataset_cfg("imagenet", root=str(flat)), "test")
    with pytest.raises(DatasetNotFoundError):
        build_dataset(dataset_cfg("imagenet", root=str(tmp_path / "none")), "train")


# --------------------------------------------------------------------------------------------
# Registry, torchvision datasets, config objects
# --------------------------------------------------------------------------------------------


def test_unknown_dataset_and_split() -> None:
    with pytest.raises(ValueError) as info:
        build_dataset(OmegaConf.create({"name": "mnist-ish"}), "train")
    for name in ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagenet", "imagefolder"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="pretrain"):
        build_dataset(dataset_cfg("fashion_mnist"), "validation")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
@pytest.mark.parametrize("split", ["pretrain", "test"])
def test_torchvision_datasets_missing(tmp_path: Path, name: str, split: str) -> None:
    root = tmp_path / name
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(dataset_cfg(name, root=str(root)), split)
    message = str(info.value)
    assert str(root) in message and "dataset.download=true" in message
    assert "dataset.root" in message


def test_has_labels_sees_through_wrappers(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    ds = build_dataset(dataset_cfg("fashion_mnist", root=str(tmp_path)), "train")
    assert has_labels(Subset(ds, [0, 1]))
    assert not has_labels(Subset(ImageFolderDataset(str(populate(tmp_path / "u")[0].parent)), [0]))
    assert not has_labels([1, 2, 3])  # type: ignore[arg-type]


def test_plain_attribute_config(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    cfg = SimpleNamespace(name="fashion_mnist", root=str(tmp_path), download=False)
    assert len(build_dataset(cfg, "test")) == 3
