"""Datasets as `(PIL RGB image, int label)` pairs, built by name from a `dataset` config node.

Datasets apply no transforms: the data module wraps them with multi-crop views for pretraining
or with the clean evaluation transform. Unlabelled data has label -1. Every dataset returned by
`build_dataset` exposes `.has_labels: bool`, `.num_classes: int | None` and `.classes`.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from omegaconf.errors import MissingMandatoryValue
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ssl.data.mixed_labels import WithUnlabelled

SPLITS = ("pretrain", "train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# Where `dataset.download=true` puts Fashion-MNIST when `dataset.root` is not set.
FASHION_MNIST_DOWNLOAD_DIR = "./data/fashion_mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetNotFoundError(FileNotFoundError):
    """The data for a configured dataset is not on disk; the message says how to get it."""


class UnreadableImageError(OSError):
    """An image file that cannot be decoded (empty, truncated, corrupt, not an image at all).

    Raised by `load_image`; the data loaders catch it and skip the file instead of crashing a
    worker (see `ssl.data.datamodule.TransformedDataset`).
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read `key` from a DictConfig, a mapping or any attribute object; unset (`???`) -> None."""
    try:
        if isinstance(cfg, Mapping):
            return cfg.get(key, default)
        return getattr(cfg, key, default)
    except MissingMandatoryValue:
        return None


def _root(cfg: Any, key: str = "root") -> str | None:
    """The configured directory, with `~` expanded; None when unset."""
    value = _cfg_get(cfg, key)
    if value is None or str(value) == "":
        return None
    return os.path.expanduser(str(value))


def _require_root(cfg: Any, what: str) -> str:
    root = _root(cfg)
    if root is None:
        raise DatasetNotFoundError(
            f"{what}: dataset.root is not set; pass dataset.root=/path/to/data on the command line."
        )
    return root


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB so that every backbone sees three channels.

    16/32-bit integer and float images are rescaled instead of clipped (a plain `convert("RGB")`
    turns most of a 16-bit image white); palette images with transparency go through RGBA to
    avoid Pillow's warning.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16"):
        arr = np.asarray(image.convert("I"), dtype=np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif mode == "I":
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
        if lo < 0 or hi > 65535:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        elif hi > 255:
            arr = arr / 257.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif mode == "F":
        arr = np.nan_to_num(np.asarray(image, dtype=np.float64))
        if arr.size and arr.min() >= 0 and arr.max() <= 1.0:
            arr = arr * 255.0
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    elif mode == "PA" or (mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except ValueError:  # exotic modes without a direct path to RGB
        return image.convert("RGBA").convert("RGB")


def load_image(path: str) -> Image.Image:
    """Open an image file as RGB, decoded in full here, so that a broken file fails here.

    Any decoding failure becomes `UnreadableImageError(path, reason)`. Truncated files count as
    broken: `ImageFile.LOAD_TRUNCATED_IMAGES` is left off, so they are skipped, not half-grey.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return to_rgb(image)
    except Exception as error:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, ...
        raise UnreadableImageError(path, _unreadable_reason(path, error)) from error


def _unreadable_reason(path: str, error: Exception) -> str:
    """A short reason for the report: the file's own name is already in the message."""
    if isinstance(error, FileNotFoundError):
        return "file not found (removed after the folder was scanned?)"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(error, UnidentifiedImageError):
        return "cannot identify image file (not an image, or an unsupported format)"
    return f"{type(error).__name__}: {error}"


def next_readable(dataset: Dataset, index: int) -> tuple[int, Any]:
    """`(i, dataset[i])` for the first readable i from `index` on, wrapping around the dataset."""
    n = len(dataset)  # type: ignore[arg-type]
    first: UnreadableImageError | None = None
    for step in range(n):
        i = (index + step) % n
        try:
            return i, dataset[i]
        except UnreadableImageError as error:
            first = first or error
    raise UnreadableImageError(
        first.path if first else "?",
        f"none of the {n} images of the dataset can be decoded (this one: {first.reason if first else '?'})",
    )


def has_labels(dataset: Dataset) -> bool:
    """Whether `dataset` (or the dataset a Subset/wrapper holds) carries real labels."""
    while dataset is not None:
        flag = getattr(dataset, "has_labels", None)
        if flag is not None:
            return bool(flag)
        dataset = getattr(dataset, "dataset", None)
    return False


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)
# --------------------------------------------------------------------------------------------

_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """Parse an idx file (gzip or raw, detected from the magic bytes) into a read-only array."""
    stat = os.stat(path)
    return _read_idx_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> np.ndarray:
    # Cached so pretrain/train splits and repeated `build_dataset` calls share one array.
    del mtime_ns, size  # part of the cache key only
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {data[:4]!r})")
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape)) if shape else 1
    if len(data) - header != count * dtype.itemsize:
        raise ValueError(f"{path}: idx header says shape {shape} but the payload size disagrees")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(shape)
    array = array.astype(dtype.newbyteorder("="), copy=False)
    array.setflags(write=False)
    return array


def _idx_names(stem: str, kind: str) -> list[str]:
    """Accepted file names: `train-images-idx3-ubyte` and `train-images.idx3-ubyte`, +/- `.gz`."""
    names = [f"{stem}-{kind}-ubyte", f"{stem}.{kind}-ubyte"]
    return [n + ext for n in names for ext in (".gz", "")]


def _find_file(dirs: Sequence[str], names: Sequence[str]) -> str | None:
    for directory in dirs:
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path
    return None


class FashionMNISTDataset(Dataset):
    """Fashion-MNIST from idx files, kept as one uint8 (N, 28, 28) array; PIL built per item."""

    has_labels = True
    num_classes = 10
    classes = list(FASHION_MNIST_CLASSES)

    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"Fashion-MNIST images {images.shape} and labels {labels.shape} do not match")
        self.images = images
        self.targets = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]).convert("RGB"), int(self.targets[index])


def _fashion_mnist_dirs(root: str | None) -> list[str]:
    base = root if root is not None else FASHION_MNIST_SYSTEM_DIR
    # Also torchvision's layout, which is what `download=true` produces.
    return [base, os.path.join(base, "FashionMNIST", "raw")]


def _find_fashion_mnist(dirs: Sequence[str], stem: str) -> tuple[str, str] | None:
    images = _find_file(dirs, _idx_names(f"{stem}-images", "idx3"))
    labels = _find_file(dirs, _idx_names(f"{stem}-labels", "idx1"))
    return (images, labels) if images and labels else None


def _download_fashion_mnist(root: str) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(root, train=True, download=True)
    except (RuntimeError, OSError) as e:
        raise DatasetNotFoundError(
            f"Downloading Fashion-MNIST into {os.path.abspath(root)} failed: {e}\n"
            f"Without a network, install the Debian package instead: "
            f"apt-get install dataset-fashion-mnist"
        ) from e


def build_fashion_mnist(cfg: Any, split: str) -> Dataset:
    """Fashion-MNIST from `dataset.root`, else from the Debian package's directory."""
    root = _root(cfg)
    stem = "t10k" if split == "test" else "train"
    dirs = _fashion_mnist_dirs(root)
    found = _find_fashion_mnist(dirs, stem)
    if found is None and _cfg_get(cfg, "download", False):
        target = root if root is not None else FASHION_MNIST_DOWNLOAD_DIR
        _download_fashion_mnist(target)
        dirs = _fashion_mnist_dirs(target)
        found = _find_fashion_mnist(dirs, stem)
    if found is None:
        tried = "\n".join(f"  {os.path.abspath(d)}" for d in dirs)
        raise DatasetNotFoundError(
            f"Fashion-MNIST {stem} files not found. Looked for "
            f"{stem}-images-idx3-ubyte and {stem}-labels-idx1-ubyte (also .gz, and the "
            f"'{stem}-images.idx3-ubyte' spelling) in:\n{tried}\n"
            f"To get the data, either\n"
            f"  - apt-get install dataset-fashion-mnist  (installs {FASHION_MNIST_SYSTEM_DIR}), or\n"
            f"  - set dataset.root=/path/to/idx/files, or\n"
            f"  - set dataset.download=true (needs a network; downloads into dataset.root, "
            f"default {FASHION_MNIST_DOWNLOAD_DIR})"
        )
    images_path, labels_path = found
    return FashionMNISTDataset(read_idx(images_path), read_idx(labels_path))


# --------------------------------------------------------------------------------------------
# torchvision datasets (CIFAR-10/100, STL-10)
# --------------------------------------------------------------------------------------------


class TorchvisionDataset(Dataset):
    """Adapts a torchvision dataset to the `(RGB PIL, int label)` + metadata contract."""

    def __init__(self, base: Dataset, has_labels: bool, num_classes: int | None) -> None:
        self.base = base
        self.has_labels = has_labels
        self.num_classes = num_classes if has_labels else None
        self.classes = list(getattr(base, "classes", []))

    @property
    def targets(self) -> list[int]:
        """All labels without decoding images (CIFAR `.targets`, STL `.labels`)."""
        labels = getattr(self.base, "targets", None)
        if labels is None:
            labels = getattr(self.base, "labels", None)
        if labels is None:
            return [-1] * len(self)
        return [int(x) for x in labels]

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.base[index]
        if image.mode != "RGB":
            image = to_rgb(image)
        return image, int(label) if self.has_labels else -1


def _torchvision_or_error(
    factory: Callable[[], Dataset], what: str, root: str, layout: str, download: bool
) -> Dataset:
    """Build a torchvision dataset, turning its "Dataset not found" into an actionable error."""
    try:
        return factory()
    except (RuntimeError, OSError) as e:
        if download:
            hint = f"Downloading failed ({e}); check the network, or copy the data there by hand."
        else:
            hint = "Set dataset.download=true to download it there (needs a network)."
        raise DatasetNotFoundError(
            f"{what} not found under {os.path.abspath(root)} (torchvision expects {layout} "
            f"inside dataset.root). {hint} Or set dataset.root=/path/to/dir that holds {layout}."
        ) from e


def _cifar_builder(name: str, num_classes: int, folder: str) -> Callable[[Any, str], Dataset]:
    def build(cfg: Any, split: str) -> Dataset:
        from torchvision import datasets

        root = _require_root(cfg, name)
        download = bool(_cfg_get(cfg, "download", False))
        cls = datasets.CIFAR10 if num_classes == 10 else datasets.CIFAR100
        base = _torchvision_or_error(
            lambda: cls(root, train=split != "test", download=download),
            name, root, folder, download,
        )  # fmt: skip
        return TorchvisionDataset(base, has_labels=True, num_classes=num_classes)

    build.__doc__ = f"{name} via torchvision: pretrain/train -> train split, test -> test split."
    return build


def build_stl10(cfg: Any, split: str) -> Dataset:
    """STL-10 via torchvision: pretrain -> 100k unlabeled, train -> 5k train, test -> 8k test."""
    from torchvision import datasets

    root = _require_root(cfg, "STL-10")
    download = bool(_cfg_get(cfg, "download", False))
    tv_split = {"pretrain": "unlabeled", "train": "train", "test": "test"}[split]
    base = _torchvision_or_error(
        lambda: datasets.STL10(root, split=tv_split, download=download),
        "STL-10", root, "stl10_binary/", download,
    )  # fmt: skip
    labelled = tv_split != "unlabeled"
    return TorchvisionDataset(base, has_labels=labelled, num_classes=10)


# --------------------------------------------------------------------------------------------
# Image folders (imagefolder, imagenet)
# --------------------------------------------------------------------------------------------


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _walk_images(directory: str) -> list[str]:
    """All image files below `directory`, recursively, in a deterministic (sorted) order."""
    found: list[str] = []
    for current, dirs, files in os.walk(directory, followlinks=True):
        dirs[:] = sorted(d for d in dirs if _visible(d))
        found.extend(os.path.join(current, f) for f in sorted(files) if _visible(f) and _is_image(f))
    return found


def _scan_top(root: str) -> tuple[list[str], list[str]]:
    """(image file names, sub-directory names) directly in `root`, sorted."""
    files, dirs = [], []
    with os.scandir(root) as entries:
        for entry in entries:
            if not _visible(entry.name):
                continue
            if entry.is_dir():
                dirs.append(entry.name)
            elif entry.is_file() and _is_image(entry.name):
                files.append(entry.name)
    return sorted(files), sorted(dirs)


def folder_classes(root: str) -> list[str] | None:
    """Class names of a class-folder layout (sorted sub-folder names); None for unlabeled."""
    files, dirs = _scan_top(root)
    return None if files or not dirs else dirs


class ImageFolderDataset(Dataset):
    """Images under `root`: class sub-folders give labels, anything else is unlabeled.

    - `root/<class>/**/*.png` (only folders at the top level) -> labelled, classes sorted by name;
    - a flat folder, or image files next to sub-folders -> unlabeled (label -1), recursive.
    Unlike torchvision's ImageFolder, a plain folder of images is accepted (for pretraining).
    `classes` fixes the class -> index map (so a test folder matches its train folder).
    `unlabelled=True` reads every image below `root` with label -1, sub-folders or not (a pool
    of images without labels, `dataset.unlabelled_root`).
    """

    def __init__(self, root: str, classes: Sequence[str] | None = None, unlabelled: bool = False) -> None:
        self.root = os.path.expanduser(str(root))
        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(
                f"Image folder {os.path.abspath(self.root)} does not exist (or is not a directory);"
                f" set dataset.root (or dataset.test_root) to a folder of images."
            )
        own_classes = None if unlabelled else folder_classes(self.root)
        self.samples: list[tuple[str, int]]
        if own_classes is None:
            self.classes: list[str] = []
            self.samples = [(p, -1) for p in _walk_images(self.root)]
        else:
            self.classes = list(classes) if classes is not None else own_classes
            index = {name: i for i, name in enumerate(self.classes)}
            unknown = [c for c in own_classes if c not in index]
            if unknown:
                raise ValueError(
                    f"{self.root} has class folders {unknown} that are not among the "
                    f"{len(self.classes)} training classes"
                )
            self.samples = [
                (path, index[name])
                for name in own_classes
                for path in _walk_images(os.path.join(self.root, name))
            ]
        if not self.samples:
            raise DatasetNotFoundError(
                f"No images were found under {os.path.abspath(self.root)} (recognised extensions,"
                f" case-insensitive: {' '.join(e[1:] for e in IMAGE_EXTENSIONS)}); point"
                f" dataset.root (or dataset.test_root) at a folder that holds image files."
            )
        self._check_one_readable()
        self.has_labels = own_classes is not None
        self.num_classes: int | None = len(self.classes) if self.has_labels else None

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        """Raises `UnreadableImageError` for a broken file; the loaders skip it."""
        path, label = self.samples[index]
        return load_image(path), label

    def _check_one_readable(self) -> None:
        """Fail now, not in a worker, when no file decodes; usually costs one image decode."""
        try:
            next_readable(self, 0)
        except UnreadableImageError as error:
            raise DatasetNotFoundError(
                f"None of the {len(self.samples)} image files under {os.path.abspath(self.root)} can be"
                f" decoded (e.g. {error.path}); they are empty, truncated or not images. Point"
                f" dataset.root at readable images."
            ) from error


def build_imagefolder(cfg: Any, split: str) -> Dataset:
    """`dataset.root` for pretrain/train; `dataset.test_root` (same layout) for test.

    pretrain with `dataset.unlabelled_root`: the root's images, then that pool's (label -1).
    """
    if split != "test":
        dataset = ImageFolderDataset(_require_root(cfg, "imagefolder"))
        pool = _root(cfg, "unlabelled_root")
        if split == "pretrain" and pool is not None:
            return WithUnlabelled(dataset, ImageFolderDataset(pool, unlabelled=True))
        return dataset
    test_root = _root(cfg, "test_root")
    if test_root is None:
        raise DatasetNotFoundError(
            "imagefolder has no test split: dataset.test_root is null. Set "
            "dataset.test_root=/path/to/labelled/images (class sub-folders) to evaluate."
        )
    root = _root(cfg)
    train_classes = folder_classes(root) if root is not None and os.path.isdir(root) else None
    return ImageFolderDataset(test_root, classes=train_classes)


def build_imagenet(cfg: Any, split: str) -> Dataset:
    """ImageNet as `root/train/<wnid>/*` and `root/val/<wnid>/*` (val must be in class folders)."""
    root = _require_root(cfg, "ImageNet")
    train_dir, val_dir = os.path.join(root, "train"), os.path.join(root, "val")
    if not os.path.isdir(train_dir):
        raise DatasetNotFoundError(
            f"ImageNet train folder {os.path.abspath(train_dir)} not found; set "
            f"dataset.root=/path/to/imagenet holding train/<class>/ and val/<class>/."
        )
    classes = folder_classes(train_dir)
    if classes is None:
        raise DatasetNotFoundError(f"{os.path.abspath(train_dir)} must hold one folder per class.")
    dataset = ImageFolderDataset(val_dir if split == "test" else train_dir, classes=classes)
    if not dataset.has_labels:
        raise DatasetNotFoundError(
            f"{os.path.abspath(val_dir)} is a flat folder; move the validation images into one "
            f"folder per class (e.g. with the usual valprep.sh) so that they have labels."
        )
    return dataset


def _build_webdataset(cfg: Any, split: str) -> Dataset:
    """Tar shards in webdataset layout (`dataset.urls`), streamed for pretraining (ssl/data/shards.py)."""
    from ssl.data.shards import build_webdataset

    return build_webdataset(cfg, split)  # type: ignore[return-value]


def _build_hf(cfg: Any, split: str) -> Dataset:
    """A Hugging Face `datasets` set (`dataset.name` on the Hub or a local path; ssl/data/hf_dataset.py)."""
    from ssl.data.hf_dataset import build_hf

    return build_hf(cfg, split)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

DATASETS: dict[str, Callable[[Any, str], Dataset]] = {
    "fashion_mnist": build_fashion_mnist,
    "cifar10": _cifar_builder("CIFAR-10", 10, "cifar-10-batches-py/"),
    "cifar100": _cifar_builder("CIFAR-100", 100, "cifar-100-python/"),
    "stl10": build_stl10,
    "imagenet": build_imagenet,
    "imagefolder": build_imagefolder,
    "webdataset": _build_webdataset,
    "hf": _build_hf,
}


def build_dataset(cfg: Any, split: str) -> Dataset:
    """The raw `(PIL RGB image, label)` dataset named by `cfg.name` for `split`.

    `split` is "pretrain" (what self-supervised training reads; may be unlabeled), "train"
    (labelled data for k-NN / linear probes) or "test". `cfg.builder`, when set, names the
    builder instead (dataset=hf, where `name` is the Hugging Face dataset's own name).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    name = _cfg_get(cfg, "builder") or _cfg_get(cfg, "name")
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](cfg, split)
