"""Training step: ours vs the official code (DINO, MAE), same settings, same process.

The official code is imported from a checkout you give (`--official /path/to/dino` or
`/path/to/mae`; nothing of it lives in this repository). The two sides alternate in rounds so
that machine load drifts hit both alike; the median step time of each is reported, with images/s
and the ratio ours / official.

DINO: the same ViT (official `vit_tiny` / `vit_small` vs timm's through `ssl`), head and loss
settings, AdamW with DINO's parameter groups, per-parameter clipping at 3.0, the last-layer freeze
and the EMA teacher; full steps (teacher on the 2 global crops, student on all crops).
MAE: `mae_vit_base_patch16` (decoder 512 x 8, norm-pix loss, mask ratio 0.75) vs
`objective=mae backbone=vit_b`; AdamW (0.9, 0.95), no clipping, as main_pretrain.py. The official
model draws its masks inside the step; ours come with the batch (the data loader's collate draws
them), as each framework trains.

    python scripts/official_side_by_side.py dino --official /path/to/dino --arch vit_tiny --batch 16
    python scripts/official_side_by_side.py mae --official /path/to/mae --batch 8
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # this repository's ssl (a superset of the standard library's)

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from ssl.benchmark import training_step  # noqa: E402

TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}


def crops(args: argparse.Namespace, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    big = [torch.randn(args.batch, 3, 224, 224, generator=g) for _ in range(2)]
    return big + [torch.randn(args.batch, 3, 96, 96, generator=g) for _ in range(args.local_crops)]


class OfficialDINO:
    """The official training step (main_dino.train_one_epoch's body, fp32)."""

    def __init__(self, args: argparse.Namespace) -> None:
        sys.path.insert(0, args.official)
        vits = importlib.import_module("vision_transformer")
        utils = importlib.import_module("utils")
        main_dino = importlib.import_module("main_dino")
        self.utils = utils
        student = vits.__dict__[args.arch](patch_size=16, drop_path_rate=0.1)
        teacher = vits.__dict__[args.arch](patch_size=16)
        dim = student.embed_dim
        self.student = utils.MultiCropWrapper(
            student, vits.DINOHead(dim, args.out_dim, use_bn=False, norm_last_layer=True))
        self.teacher = utils.MultiCropWrapper(teacher, vits.DINOHead(dim, args.out_dim, False))
        self.teacher.load_state_dict(self.student.state_dict())
        for p in self.teacher.parameters():
            p.requires_grad = False
        self.loss = main_dino.DINOLoss(args.out_dim, args.local_crops + 2, 0.04, 0.04, 0, 100)
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(self.student))
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = 5e-4
            if i == 0:
                group["weight_decay"] = 0.04

    def step(self, images: list[torch.Tensor]) -> None:
        teacher_output = self.teacher(images[:2])
        student_output = self.student(images)
        loss = self.loss(student_output, teacher_output, 1)
        self.optimizer.zero_grad()
        loss.backward()
        self.utils.clip_gradients(self.student, 3.0)
        self.utils.cancel_gradients_last_layer(1, self.student, 1)
        self.optimizer.step()
        with torch.no_grad():
            m = 0.996
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def our_module(overrides: list[str]) -> Any:
    """The SSLModule `python -m ssl.pretrain <overrides>` trains, with its optimizer."""
    from ssl.pretrain import CONFIG_DIR, build_module

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    module = build_module(cfg, num_samples=1000)
    module.train()
    optimizer = module.configure_optimizers()
    module.schedules = module.build_schedules(1000, 100)
    return module, optimizer


class OursDINO:
    """`python -m ssl.pretrain objective=dino` with the same settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        overrides = [
            "objective=dino", f"backbone.name={TIMM_NAMES[args.arch]}",
            "dataset=imagenet", "dataset.root=unused", f"objective.dino.out_dim={args.out_dim}",
            f"objective.dino.local_crops={args.local_crops}", "backbone.drop_path_rate=0.1",
            f"data.batch_size={args.batch}",
        ]
        self.module, self.optimizer = our_module(overrides)

    def step(self, images: list[torch.Tensor]) -> None:
        training_step(self.module, self.optimizer, {"views": images, "index": torch.arange(len(images[0]))})


class OfficialMAE:
    """The official step (engine_pretrain.train_one_epoch's body, fp32, no clipping)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import numpy as np
        import timm.models.vision_transformer as timm_vit

        # Shims for the 2021 code on today's libraries, outside its files: numpy removed np.float,
        # timm's Block no longer takes qk_scale (None there, i.e. the default scale).
        np.float = float  # type: ignore[attr-defined]
        block = timm_vit.Block

        def legacy_block(*block_args: Any, qk_scale: Any = None, **kwargs: Any) -> torch.nn.Module:
            return block(*block_args, **kwargs)

        timm_vit.Block = legacy_block
        sys.path.insert(0, args.official)
        models_mae = importlib.import_module("models_mae")
        timm_vit.Block = block
        self.model = models_mae.mae_vit_base_patch16(norm_pix_loss=True)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0}],
            lr=1.5e-4, betas=(0.9, 0.95),
        )

    def step(self, images: list[torch.Tensor]) -> None:
        loss, _, _ = self.model(images[0], mask_ratio=0.75)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()


class OursMAE:
    """`python -m ssl.pretrain objective=mae backbone=vit_b dataset=imagenet`."""

    def __init__(self, args: argparse.Namespace) -> None:
        overrides = ["objective=mae", "backbone=vit_b", "dataset=imagenet", "dataset.root=unused",
                     f"data.batch_size={args.batch}"]
        self.module, self.optimizer = our_module(overrides)
        self.masks = self.module.objectives["mae"].batch_maskers()

    def step(self, images: list[torch.Tensor]) -> None:
        batch: dict[str, Any] = {"plain_views": images[:1], "index": torch.arange(len(images[0]))}
        for masker in self.masks:  # drawn by the data loader's collate in training
            batch.update(masker(len(images[0])))
        training_step(self.module, self.optimizer, batch)


def timed(side: Any, images: list[torch.Tensor], steps: int) -> list[float]:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        side.step(images)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["dino", "mae"])
    parser.add_argument("--official", required=True, help="a checkout of facebookresearch/dino or /mae")
    parser.add_argument("--arch", default="vit_tiny", choices=sorted(TIMM_NAMES))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--out-dim", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    # The official DINOLoss all-reduces its centre unconditionally: a one-process group for both.
    with tempfile.TemporaryDirectory() as tmp:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    torch.manual_seed(0)
    if args.method == "dino":
        sides = {"official": OfficialDINO(args), "ours": OursDINO(args)}
        images = crops(args, 0)
    else:
        sides = {"official": OfficialMAE(args), "ours": OursMAE(args)}
        images = [torch.randn(args.batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))]
    for side in sides.values():
        timed(side, images, 2)  # warm-up: allocator, lazy optimizer state
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            times[name] += timed(side, images, args.steps)
    images_per_step = args.batch
    setting = (f"DINO {args.arch}/16, 2x224 + {args.local_crops}x96, out_dim {args.out_dim}"
               if args.method == "dino" else "MAE ViT-B/16, 224 px, mask 0.75, decoder 512x8")
    print(f"{setting}, batch {args.batch}, fp32, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| implementation | median s / step | images / s |")
    print("|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {images_per_step / median:.1f} |")
    print(f"ours / official step time: {medians['ours'] / medians['official']:.3f}")


if __name__ == "__main__":
    main()
