"""Student cost of data2vec 1.0 vs 2.0 at the same ViT and batch, measured round-robin.

    python scripts/data2vec_step_cost.py --depth 12 --batch 64 --rounds 5 [--threads 1] [--device cuda]

Each round times one forward + backward of every variant in turn, so that load from other
processes hits all of them alike; the median over rounds is reported. Variants:
- `d2v1 student`: data2vec 1.0's student (all tokens, mask token at masked positions) + head;
- `d2v2 encoder xC`: data2vec 2.0's encoder on the visible tokens of C masked copies per image;
- `d2v1 loss` / `d2v2 loss xC`: the objective's whole loss (teacher pass, targets, decoder) + backward.
Per image and per masked copy (a "student sample") are printed. `ssl.benchmark` measures the full
optimizer step; this isolates the part data2vec 2.0 changes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this package, not the stdlib ssl

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from ssl.backbones.factory import build_backbone  # noqa: E402
from ssl.data.spec import PLAIN_VIEWS  # noqa: E402
from ssl.objectives import recipe_settings  # noqa: E402
from ssl.objectives.base import StepContext  # noqa: E402
from ssl.objectives.data2vec import Data2Vec  # noqa: E402
from ssl.objectives.data2vec2 import Data2Vec2  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image", type=int, default=28)
    parser.add_argument("--patch", type=int, default=4)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--clones", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    vit = build_backbone(OmegaConf.create({
        "name": args.model, "img_size": args.image, "patch_size": args.patch, "drop_path_rate": 0.0,
        "kwargs": {"depth": args.depth}})).to(device)
    teacher = torch.nn.ModuleDict({"backbone": copy.deepcopy(vit)}).eval().requires_grad_(False)
    images = torch.randn(args.batch, 3, args.image, args.image, device=device)
    g = torch.Generator().manual_seed(0)

    def with_masks(objective: torch.nn.Module) -> dict:
        batch = {PLAIN_VIEWS: [images]}
        for masker in objective.batch_maskers():
            batch.update({k: v.to(device) for k, v in masker(args.batch, g).items()})
        return batch

    d1 = Data2Vec(vit, **recipe_settings("data2vec", image_size=args.image)).to(device)
    b1 = with_masks(d1)
    mask1 = b1[d1.block_masker().mask_key].bool()
    variants = {
        "d2v1 student": (lambda: d1.student_predictions(vit, images, mask1).sum(), 1),
        "d2v1 loss": (lambda: d1.loss(b1, vit, teacher, StepContext()).loss, 1),
    }
    for clones in args.clones:
        settings = recipe_settings("data2vec2", image_size=args.image, clone_batch=clones)
        d2 = Data2Vec2(vit, **settings).to(device)
        b2 = with_masks(d2)
        ids = b2[d2.block_masker().ids_shuffle_key]
        variants[f"d2v2 encoder x{clones}"] = (
            lambda d2=d2, ids=ids: d2.encode_visible(vit, images, ids)[0].sum(), clones)
        variants[f"d2v2 loss x{clones}"] = (
            lambda d2=d2, b2=b2: d2.loss(b2, vit, teacher, StepContext()).loss, clones)

    def run(fn) -> float:
        start = time.perf_counter()
        fn().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        vit.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in variants}
    for fn, _ in variants.values():  # warm-up
        run(fn)
    for _ in range(args.rounds):
        for name, (fn, _) in variants.items():
            times[name].append(run(fn))
    print(f"{args.model} depth {args.depth}, {args.image} px / patch {args.patch}, batch {args.batch}, "
          f"device {device}, threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print("| variant | s per batch | images/s | masked copies/s |")
    print("|---|---|---|---|")
    for name, (_, clones) in variants.items():
        t = statistics.median(times[name])
        print(f"| {name} | {t:.3f} | {args.batch / t:.1f} | {args.batch * clones / t:.1f} |")


if __name__ == "__main__":
    main()
