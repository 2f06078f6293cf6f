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

On a GPU (`--device cuda`, the default when one is present) both sides run under the same
`--amp`: fp16 with a GradScaler is what both official trainings use by default (DINO's
`--use_fp16 true`, MAE's NativeScaler); `--amp bf16` is our default on GPUs that support it.
The official DINO recipe at its batch per GPU:

    python scripts/official_side_by_side.py dino --official /path/to/dino --arch vit_small \
        --batch 64 --local-crops 10 --amp fp16
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

from ssl.benchmark.step import attach_grad_scaler, training_step  # noqa: E402
from ssl.benchmark.timing import synchronize  # noqa: E402

TIMM_NAMES = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}
AMP = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def autocast(args: argparse.Namespace) -> Any:
    return torch.autocast(args.device.type, dtype=AMP[args.amp], enabled=args.amp != "none")


def grad_scaler(args: argparse.Namespace) -> torch.amp.GradScaler | None:
    """Loss scaling for fp16, as both official trainings do it; None otherwise."""
    return torch.amp.GradScaler(args.device.type) if args.amp == "fp16" else None


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
        for part in (self.student, self.teacher, self.loss):
            part.to(args.device)
        self.args, self.scaler = args, grad_scaler(args)
        self.optimizer = torch.optim.AdamW(utils.get_params_groups(self.student))
        for i, group in enumerate(self.optimizer.param_groups):
            group["lr"] = 5e-4
            if i == 0:
                group["weight_decay"] = 0.04

    def step(self, images: list[torch.Tensor]) -> None:
        with autocast(self.args):
            teacher_output = self.teacher(images[:2])
            student_output = self.student(images)
            loss = self.loss(student_output, teacher_output, 1)
        self.optimizer.zero_grad()
        if self.scaler is None:
            loss.backward()
            self.utils.clip_gradients(self.student, 3.0)
            self.utils.cancel_gradients_last_layer(1, self.student, 1)
            self.optimizer.step()
        else:  # main_dino.train_one_epoch with --use_fp16 true
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self.utils.clip_gradients(self.student, 3.0)
            self.utils.cancel_gradients_last_layer(1, self.student, 1)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        with torch.no_grad():
            m = 0.996
            for param_q, param_k in zip(self.student.parameters(), self.teacher.parameters()):
                param_k.data.mul_(m).add_((1 - m) * param_q.detach().data)


def our_module(overrides: list[str], args: argparse.Namespace) -> Any:
    """The SSLModule `python -m ssl.pretrain <overrides>` trains, with its optimizer, on the device."""
    from ssl.config import CONFIG_DIR
    from ssl.pretrain import build_module

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    module = build_module(cfg, num_samples=1000).to(args.device)
    module.train()
    optimizer = module.configure_optimizers()
    module.schedules = module.build_schedules(1000, 100)
    scaler = attach_grad_scaler(module, args.device) if args.amp == "fp16" else None
    return module, optimizer, scaler


class Ours:
    """One full step of our module, as Lightning drives it, under the chosen autocast."""

    def __init__(self, overrides: list[str], args: argparse.Namespace) -> None:
        self.module, self.optimizer, self.scaler = our_module(overrides, args)
        self.dtype = AMP[args.amp]

    def run(self, batch: dict[str, Any]) -> None:
        training_step(self.module, self.optimizer, batch, self.dtype, self.scaler)


class OursDINO(Ours):
    """`python -m ssl.pretrain objective=dino` with the same settings."""

    def __init__(self, args: argparse.Namespace) -> None:
        overrides = [
            "objective=dino", f"backbone.name={TIMM_NAMES[args.arch]}",
            "dataset=imagenet", "dataset.root=unused", f"objective.dino.out_dim={args.out_dim}",
            f"objective.dino.local_crops={args.local_crops}", "backbone.drop_path_rate=0.1",
            f"data.batch_size={args.batch}",
        ]
        super().__init__(overrides, args)

    def step(self, images: list[torch.Tensor]) -> None:
        self.run({"views": images, "index": torch.arange(len(images[0]), device=images[0].device)})


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
        self.model = models_mae.mae_vit_base_patch16(norm_pix_loss=True).to(args.device)
        self.args, self.scaler = args, grad_scaler(args)
        decay = [p for p in self.model.parameters() if p.requires_grad and p.ndim > 1]
        plain = [p for p in self.model.parameters() if p.requires_grad and p.ndim <= 1]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.05}, {"params": plain, "weight_decay": 0.0}],
            lr=1.5e-4, betas=(0.9, 0.95),
        )

    def step(self, images: list[torch.Tensor]) -> None:
        with autocast(self.args):
            loss, _, _ = self.model(images[0], mask_ratio=0.75)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # util.misc.NativeScalerWithGradNormCount: scale, backward, unscale, grad norm, step
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            grads = [p.grad.detach() for p in self.model.parameters() if p.grad is not None]
            torch.norm(torch.stack([g.norm() for g in grads]))
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad()


class OursMAE(Ours):
    """`python -m ssl.pretrain objective=mae backbone=vit_b dataset=imagenet`."""

    def __init__(self, args: argparse.Namespace) -> None:
        overrides = ["objective=mae", "backbone=vit_b", "dataset=imagenet", "dataset.root=unused",
                     f"data.batch_size={args.batch}"]
        super().__init__(overrides, args)
        self.masks = self.module.objectives["mae"].batch_maskers()

    def step(self, images: list[torch.Tensor]) -> None:
        device = images[0].device
        index = torch.arange(len(images[0]), device=device)
        batch: dict[str, Any] = {"plain_views": images[:1], "index": index}
        for masker in self.masks:  # drawn by the data loader's collate in training, then moved
            batch.update({k: v.to(device, non_blocking=True) for k, v in masker(len(images[0])).items()})
        self.run(batch)


def timed(side: Any, images: list[torch.Tensor], steps: int) -> list[float]:
    """Seconds per step, the device drained before and after each."""
    device = images[0].device
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        side.step(images)
        synchronize(device)
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--amp", choices=sorted(AMP), default=None,
                        help="autocast for both sides (default: fp16 on CUDA, as both official "
                             "trainings; none on CPU)")
    args = parser.parse_args()
    args.device = torch.device(args.device)
    args.amp = args.amp or ("fp16" if args.device.type == "cuda" else "none")
    warnings.simplefilter("ignore")
    # The official DINOLoss all-reduces its centre unconditionally: a one-process group for both.
    with tempfile.TemporaryDirectory() as tmp:
        backend = "nccl" if args.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"file://{tmp}/pg", rank=0, world_size=1)
    torch.manual_seed(0)
    if args.method == "dino":
        sides = {"official": OfficialDINO(args), "ours": OursDINO(args)}
        images = [c.to(args.device) for c in crops(args, 0)]
    else:
        sides = {"official": OfficialMAE(args), "ours": OursMAE(args)}
        generator = torch.Generator().manual_seed(0)
        images = [torch.randn(args.batch, 3, 224, 224, generator=generator).to(args.device)]
    for side in sides.values():
        timed(side, images, 2)  # warm-up: allocator, lazy optimizer state
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, side in sides.items():
            times[name] += timed(side, images, args.steps)
    images_per_step = args.batch
    setting = (f"DINO {args.arch}/16, 2x224 + {args.local_crops}x96, out_dim {args.out_dim}"
               if args.method == "dino" else "MAE ViT-B/16, 224 px, mask 0.75, decoder 512x8")
    where = (torch.cuda.get_device_name(args.device) if args.device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads")
    print(f"{setting}, batch {args.batch}, amp {args.amp}, {where}, "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| implementation | median s / step | images / s |")
    print("|---|---|---|")
    medians = {name: statistics.median(t) for name, t in times.items()}
    for name, median in medians.items():
        print(f"| {name} | {median:.3f} | {images_per_step / median:.1f} |")
    print(f"ours / official step time: {medians['ours'] / medians['official']:.3f}")


if __name__ == "__main__":
    main()
