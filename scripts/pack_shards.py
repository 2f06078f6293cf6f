"""Pack an image folder (or a built-in dataset) into tar shards in webdataset layout.

    python scripts/pack_shards.py /data/imagenet/train /data/shards/imagenet-train --samples-per-shard 1250
    python scripts/pack_shards.py fashion_mnist /data/shards/fmnist-train                 # the Debian package
    python scripts/pack_shards.py fashion_mnist /data/shards/fmnist-test --split test --prefix test

Folder files keep their bytes (no re-encoding; the member's extension is the file's); built-in
datasets are written as PNG (lossless). Class folders give a `cls` member (the class index in
sorted folder order, as `dataset=imagefolder` numbers them) and a `classes.txt` beside the
shards. Samples are shuffled with `--seed` before packing (`--no-shuffle` keeps the order), so
every shard mixes classes and a small shuffle buffer suffices. Writes `index.json` (samples per
shard) and prints the `dataset=webdataset` overrides that read the result.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Our package before the standard library's `ssl`, which torch would otherwise import first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ssl.config import CONFIG_DIR  # noqa: E402
from ssl.data.datasets import DATASETS, ImageFolderDataset, build_dataset  # noqa: E402
from ssl.data.shard_writer import ShardWriter  # noqa: E402


def folder_samples(root: str, order: np.ndarray | None) -> tuple[list[str], object]:
    """(class names, iterator of (sample, label)) of an image folder, its files' bytes unchanged."""
    folder = ImageFolderDataset(root)
    indices = order if order is not None else np.arange(len(folder.samples))

    def samples():
        for i in indices:
            path, label = folder.samples[int(i)]
            with open(path, "rb") as f:
                yield {os.path.splitext(path)[1][1:].lower(): f.read()}, label

    return folder.classes, samples()


def dataset_samples(name: str, split: str, root: str | None,
                    order_seed: int | None) -> tuple[list[str], object]:
    """A built-in dataset's images as PNG bytes."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "dataset" / f"{name}.yaml")
    if root is not None:
        cfg.root = root
    data = build_dataset(cfg, split)
    indices = np.arange(len(data))
    if order_seed is not None:
        indices = np.random.default_rng(order_seed).permutation(len(data))

    def samples():
        for i in indices:
            image, label = data[int(i)]
            out = io.BytesIO()
            image.save(out, "png")
            yield {"png": out.getvalue()}, label

    return list(getattr(data, "classes", [])), samples()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help=f"an image folder, or a dataset name ({', '.join(sorted(DATASETS))})")
    parser.add_argument("out", help="output directory for <prefix>-NNNNNN.tar, index.json, classes.txt")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--prefix", default="train")
    parser.add_argument("--split", default="train", choices=("pretrain", "train", "test"),
                        help="which split of a named dataset (folders: the folder itself)")
    parser.add_argument("--root", default=None, help="dataset.root of a named dataset")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--no-shuffle", action="store_true", help="keep the source's order")
    parser.add_argument("--limit", type=int, default=None, help="pack the first N samples only")
    args = parser.parse_args(argv)

    seed = None if args.no_shuffle else args.seed
    if os.path.isdir(args.source):
        count = len(ImageFolderDataset(args.source).samples)
        order = None if seed is None else np.random.default_rng(seed).permutation(count)
        classes, samples = folder_samples(args.source, order)
    elif args.source in DATASETS:
        classes, samples = dataset_samples(args.source, args.split, args.root, seed)
    else:
        parser.error(f"{args.source} is neither a folder nor a dataset name ({', '.join(sorted(DATASETS))})")
    start = time.perf_counter()
    with ShardWriter(args.out, prefix=args.prefix, samples_per_shard=args.samples_per_shard) as writer:
        for n, (sample, label) in enumerate(samples):  # type: ignore[attr-defined]
            if args.limit is not None and n >= args.limit:
                break
            if label >= 0:
                sample["cls"] = str(int(label)).encode()
            writer.write(f"{n:09d}", sample)
    if classes:
        Path(args.out, "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    total = sum(writer.counts)
    took = time.perf_counter() - start
    print(f"{total} samples in {len(writer.counts)} shards under {args.out} ({took:.1f} s)")
    labels = f" dataset.label_key=cls dataset.num_classes={len(classes)}" if classes else ""
    print(f"read them with: dataset=webdataset 'dataset.urls=\"{writer.pattern()}\"' "
          f"dataset.index={os.path.join(args.out, 'index.json')}{labels}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
