"""Images/s read and decoded from tar shards vs from the same images as a folder, workers 1..N.

    python scripts/shard_throughput.py                                   # Fashion-MNIST PNGs, 28 px
    python scripts/shard_throughput.py --jpeg-size 224 --images 8000     # the same, as 224 px JPEGs
    python scripts/shard_throughput.py --folder /data/imagenet/train --images 20000 --workers 1 2 4 8

Both sides are the training loaders themselves minus the augmentations: the folder through
TransformedDataset + ResumableSampler (`dataset=imagefolder`), the shards through the shard
stream (`dataset=webdataset`, shuffle buffer as configured), each sample decoded to RGB and
turned into a uint8 tensor, batches collated by the data module's collate step. The shards are
packed from the folder's files unchanged (scripts/pack_shards.py), so both decode the same
bytes. Each setting runs one warm-up pass of each loader, then `--rounds` timed passes alternating
folder and shards (so both see the same machine load), and reports the medians (page cache
warm for both: what a cold object store or disk costs is not measured here). The shard loader
starts its workers anew each pass (as in training), the folder's are persistent (as in
training). Prints a markdown table and JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Our package before the standard library's `ssl`, which torch would otherwise import first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from ssl.data.datamodule import MaskingCollate, TransformedDataset  # noqa: E402
from ssl.data.datasets import ImageFolderDataset, build_fashion_mnist  # noqa: E402
from ssl.data.pil_ops import to_uint8_tensor  # noqa: E402
from ssl.data.resumable_sampler import ResumableSampler  # noqa: E402
from ssl.data.shard_stream import ShardStream, StreamCollate, StreamLoader, StreamPlan  # noqa: E402
from ssl.data.shard_urls import expand_urls  # noqa: E402
from ssl.data.shards import ShardedImages, shard_sizes  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_shards import main as pack  # noqa: E402


def decode_only(image: Image.Image) -> dict[str, torch.Tensor]:
    return {"image": to_uint8_tensor(image)}


def write_folder(out: str, count: int, jpeg_size: int | None) -> None:
    """The first `count` Fashion-MNIST training images as class folders (PNG, or JPEG upscaled)."""
    data = build_fashion_mnist({"root": None}, "train")
    for i in range(count):
        image, label = data[i]
        folder = os.path.join(out, f"{label:02d}")
        os.makedirs(folder, exist_ok=True)
        if jpeg_size:
            big = image.resize((jpeg_size, jpeg_size), Image.BICUBIC)
            big.save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)
        else:
            image.save(os.path.join(folder, f"{i:06d}.png"))


def timed_pass(loader: DataLoader) -> tuple[int, float]:
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += len(batch["index"])
    return count, time.perf_counter() - start


def folder_loader(root: str, workers: int, batch: int) -> DataLoader:
    data = TransformedDataset(ImageFolderDataset(root), decode_only, None)
    sampler = ResumableSampler(len(data), seed=0)
    return DataLoader(data, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                      collate_fn=MaskingCollate([]), persistent_workers=workers > 0)


def shard_loader(pattern: str, index: str, workers: int, batch: int, buffer: int) -> DataLoader:
    urls = expand_urls(pattern)
    source = ShardedImages(urls, shard_sizes(urls, index), ["jpg", "png", "jpeg", "webp"], "cls", 10)
    plan = StreamPlan(source.sizes, source.num_shards, 1, workers, batch, seed=0)
    stream = ShardStream(source, plan, 0, decode_only, buffer, seed=0)

    def next_epoch(s: ShardStream) -> None:
        s.epoch += 1

    return StreamLoader(stream, next_epoch, num_workers=workers, collate_fn=StreamCollate(MaskingCollate([])))


def rates(loaders: dict[str, DataLoader], rounds: int) -> dict[str, list[float]]:
    """Images/s of each loader's passes, alternating between them so that both see the same load."""
    for loader in loaders.values():
        timed_pass(loader)  # warm-up: page cache, worker start-up of persistent workers
    out: dict[str, list[float]] = {name: [] for name in loaders}
    for _ in range(rounds):
        for name, loader in loaders.items():
            count, seconds = timed_pass(loader)
            out[name].append(count / seconds)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default=None, help="an image folder (default: Fashion-MNIST written out)")
    parser.add_argument("--images", type=int, default=20000, help="images written / packed")
    parser.add_argument("--jpeg-size", type=int, default=None, help="Fashion-MNIST upscaled to this, as JPEG")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed passes of each, alternating (median)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--shuffle-buffer", type=int, default=1000)
    parser.add_argument("--work-dir", default=None, help="where the folder and shards go (default: temp)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    work = args.work_dir or tempfile.mkdtemp(prefix="shard-throughput-")
    folder = args.folder
    if folder is None:
        folder = os.path.join(work, "folder")
        if not os.path.isdir(folder):
            write_folder(folder, args.images, args.jpeg_size)
    shards = os.path.join(work, "shards")
    if not os.path.isfile(os.path.join(shards, "index.json")):
        with open(os.devnull, "w") as quiet:
            stdout, sys.stdout = sys.stdout, quiet
            try:
                pack([folder, shards, "--samples-per-shard", str(args.samples_per_shard),
                      "--limit", str(args.images)])
            finally:
                sys.stdout = stdout
    if args.folder is not None:  # the folder side reads the same images as the shards
        subset = os.path.join(work, "subset")
        if not os.path.isdir(subset):
            names = [p for p, _ in ImageFolderDataset(folder).samples]
            order = np.random.default_rng(0).permutation(len(names))[: args.images]
            for i in order:
                link = os.path.join(subset, os.path.relpath(names[i], folder))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(os.path.abspath(names[i]), link)
        folder = subset
    index = os.path.join(shards, "index.json")
    count = len(json.load(open(index))["shards"])
    pattern = os.path.join(shards, f"train-{{000000..{count - 1:06d}}}.tar")
    size = os.path.getsize(os.path.join(shards, "train-000000.tar"))
    rows = []
    for workers in args.workers:
        loaders = {"folder": folder_loader(folder, workers, args.batch_size),
                   "shards": shard_loader(pattern, index, workers, args.batch_size, args.shuffle_buffer)}
        measured = rates(loaders, args.rounds)
        folder_ips, shard_ips = (float(np.median(measured[k])) for k in ("folder", "shards"))
        rows.append({"workers": workers, "folder_images_per_s": round(folder_ips, 1),
                     "shards_images_per_s": round(shard_ips, 1), "ratio": round(shard_ips / folder_ips, 2),
                     "passes": {k: [round(v, 1) for v in vals] for k, vals in measured.items()}})
        print(f"workers {workers}: folder {folder_ips:.0f} img/s, shards {shard_ips:.0f} img/s (medians of "
              f"{args.rounds})", file=sys.stderr)
    what = args.folder or (f"Fashion-MNIST as {args.jpeg_size} px JPEG" if args.jpeg_size
                           else "Fashion-MNIST 28 px PNG")
    result = {"images": args.images, "rounds": args.rounds, "source": what, "shards": count,
              "shard_bytes": size,
              "batch_size": args.batch_size, "shuffle_buffer": args.shuffle_buffer,
              "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    print(f"\n{args.images} images ({what}), {count} shards of {args.samples_per_shard}, batch "
          f"{args.batch_size}, shuffle buffer {args.shuffle_buffer}, {os.cpu_count()} CPUs\n")
    print("| workers | folder img/s | shards img/s | shards / folder |\n|---|---|---|---|")  # medians
    for row in rows:
        print(f"| {row['workers']} | {row['folder_images_per_s']:.0f} | {row['shards_images_per_s']:.0f} | "
              f"{row['ratio']:.2f} |")
    print(json.dumps(result))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
