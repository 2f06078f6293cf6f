"""Multi-crop augmentation throughput: every augmentation in a worker vs `data.augment_on=device`.

    python scripts/augmentation_throughput.py                      # DINO at 224 / 96 px, 2 + 8 crops
    python scripts/augmentation_throughput.py --source fashion_mnist --global-size 28 --local-size 12

Measures, in this one process (= one data-loader worker):
- images/s of decode + the full CPU recipe (crop, flip, jitter, grayscale, blur, solarize, normalise);
- images/s of decode + what a worker still does with augment_on=device (crop, flip, uint8, draws);
- images/s of decode + what a worker does with crop_on=device too (boxes and draws only);
- images/s of the batched photometric half on the training device (CUDA when present, else CPU),
  and of the crops (roi_align) + photometric half;
- bytes per image a worker hands to the loader in each mode.
The source images are JPEG bytes decoded per sample, as an ImageFolder dataset would be.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Our package before the standard library's `ssl`, which torch would otherwise import first.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ssl.benchmark.timing import total_time  # noqa: E402
from ssl.data.device_augment import DeviceAugment  # noqa: E402
from ssl.data.device_crops import SOURCE, VIEW_BOXES  # noqa: E402
from ssl.data.multicrop import MultiCropTransform  # noqa: E402
from ssl.data.photometric import VIEW_DRAWS  # noqa: E402
from ssl.data.pil_ops import IMAGENET_MEAN, IMAGENET_STD, to_uint8_tensor  # noqa: E402
from ssl.objectives.coke import MULTI_VIEW_CROPS, SINGLE_VIEW_CROPS  # noqa: E402
from ssl.objectives.dino import DINO_CROPS  # noqa: E402

RECIPES = {"dino": DINO_CROPS, "coke": MULTI_VIEW_CROPS, "coke_single_view": SINGLE_VIEW_CROPS}


def source_images(kind: str, count: int, width: int, height: int) -> list[bytes]:
    """JPEG-encoded images: smooth random colour fields (synthetic) or Fashion-MNIST digits."""
    images = []
    if kind == "fashion_mnist":
        from omegaconf import OmegaConf

        from ssl.config import CONFIG_DIR
        from ssl.data.datasets import build_dataset

        cfg = OmegaConf.load(Path(CONFIG_DIR) / "dataset" / "fashion_mnist.yaml")
        data = build_dataset(cfg, "pretrain")
        pil = [data[i][0].convert("RGB") for i in range(count)]
    else:
        g = torch.Generator().manual_seed(0)
        small = torch.randint(0, 256, (count, 3, height // 16, width // 16), generator=g, dtype=torch.uint8)
        big = torch.nn.functional.interpolate(small.float(), size=(height, width), mode="bilinear")
        pil = [Image.fromarray(img.clamp(0, 255).byte().permute(1, 2, 0).numpy()) for img in big]
    for image in pil:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def rate(fn, items: list, repeats: int = 1) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        for item in items:
            fn(item)
    return len(items) * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", choices=("synthetic", "fashion_mnist"), default="synthetic")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--globals", type=int, default=2)
    parser.add_argument("--locals", type=int, default=8)
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--recipe", default="dino", choices=sorted(RECIPES))
    args = parser.parse_args()

    torch.manual_seed(0)
    jpegs = source_images(args.source, args.images, args.width, args.height)
    transform = MultiCropTransform(args.globals, args.locals, args.global_size, args.local_size,
                                   recipe=RECIPES[args.recipe])

    def decode(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    rate(lambda d: transform(decode(d)), jpegs[:5])  # warm-up
    cpu_rate = rate(lambda d: transform(decode(d)), jpegs)
    worker_rate = rate(lambda d: transform.crops_and_draws(decode(d)), jpegs)
    crops, draws = transform.crops_and_draws(decode(jpegs[0]))
    float_bytes = sum(c.numel() * 4 for c in crops)
    uint8_bytes = sum(c.numel() for c in crops) + sum(d.numel() * 4 for d in draws)

    boxes_rate = rate(lambda d: transform.boxes_and_draws(decode(d)), jpegs)
    image_bytes = args.width * args.height * 3 if args.source == "synthetic" else 28 * 28 * 3
    box_bytes = image_bytes + sum(5 * 4 + d.numel() * 4 for d in draws)  # a box is 5 floats

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    augment = DeviceAugment(transform.view_photometrics(), None, IMAGENET_MEAN, IMAGENET_STD,
                            transform.view_sizes())
    images = [decode(jpegs[i % len(jpegs)]) for i in range(args.batch)]
    samples = [transform.crops_and_draws(image) for image in images]
    views = [torch.stack([s[0][v] for s in samples]).to(device) for v in range(len(crops))]
    rows = [torch.stack([s[1][v] for s in samples]).to(device) for v in range(len(crops))]
    boxed = [transform.boxes_and_draws(image) for image in images]
    sources = torch.stack([to_uint8_tensor(image) for image in images]).to(device)
    boxes = [torch.stack([b[0][v] for b in boxed]).to(device) for v in range(len(crops))]

    def device_rate(step: Callable[[], None], steps: int = 5) -> float:
        return args.batch * steps / total_time(step, steps, 2, device)

    photometric_rate = device_rate(lambda: augment({"views": list(views), VIEW_DRAWS: list(rows)}))
    crops_rate = device_rate(
        lambda: augment({SOURCE: sources, VIEW_BOXES: list(boxes), VIEW_DRAWS: list(rows)})
    )

    result = {
        "source": f"{args.source} {args.width}x{args.height}" if args.source == "synthetic" else args.source,
        "crops": f"{args.globals}x{args.global_size} + {args.locals}x{args.local_size}",
        "recipe": args.recipe,
        "cpu": platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "worker_full_recipe_images_per_s": cpu_rate,
        "worker_crop_only_images_per_s": worker_rate,
        "worker_speedup": worker_rate / cpu_rate,
        "worker_boxes_only_images_per_s": boxes_rate,
        "device_photometric_images_per_s": photometric_rate,
        "device_crops_and_photometric_images_per_s": crops_rate,
        "bytes_per_image_float32": float_bytes,
        "bytes_per_image_uint8_crops": uint8_bytes,
        "bytes_per_image_uint8_image_and_boxes": box_bytes,
    }
    print(json.dumps(result, indent=2))
    print("| crops | worker img/s: full recipe / augment_on=device / + crop_on=device "
          "| device img/s: photometric / crops + photometric "
          "| bytes/image: float32 / uint8 crops / image + boxes |")
    print("|---|---|---|---|")
    print(f"| {result['crops']} | {cpu_rate:.1f} / {worker_rate:.1f} / {boxes_rate:.1f} "
          f"| {photometric_rate:.0f} / {crops_rate:.0f} ({result['device']}) "
          f"| {float_bytes} / {uint8_bytes} / {box_bytes} |")


if __name__ == "__main__":
    main()
