"""Per-rank model memory under `trainer.strategy=fsdp` vs DDP, measured on CPU with gloo.

Builds the configured module (Hydra overrides as arguments, e.g. `objective=dino backbone=vit_b`)
in N processes, shards it as `trainer.strategy=fsdp` does, takes one AdamW step on a tiny random
batch, and sums the bytes each rank actually holds: parameters (student, teacher), gradients and
optimizer state. Under DDP every rank holds all of it; the DDP column is the same sum unsharded.

    python scripts/sharding_memory.py objective=dino backbone=vit_b --ranks 2
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import warnings
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # before anything imports the standard library's ssl

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

MIB = 2**20


def local_bytes(tensors: list[torch.Tensor]) -> int:
    from ssl.sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors)


def tiny_batch(module: torch.nn.Module, image_size: int, local_size: int) -> dict:
    spec = [o.view_spec() for o in module.objectives.values()][0]
    views = [torch.randn(1, 3, image_size, image_size) for _ in range(spec.global_crops)]
    views += [torch.randn(1, 3, local_size, local_size) for _ in range(spec.local_crops)]
    batch = {"index": torch.zeros(1, dtype=torch.long), "views": views}
    if spec.plain_crops:
        batch["plain_views"] = [torch.randn(1, 3, image_size, image_size) for _ in range(spec.plain_crops)]
    for objective in module.objectives.values():
        for masker in objective.batch_maskers():
            batch.update(masker(1))
    return batch


def measure(module: torch.nn.Module, cfg) -> dict[str, float]:
    optimizer = module.configure_optimizers()
    for group in optimizer.param_groups:
        group["lr"] = 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = tiny_batch(module, cfg.dataset.image_size, cfg.dataset.local_crop_size)
        loss = module.training_step(batch, 0)
    loss.backward()
    optimizer.step()
    student = [p for n, p in module.named_parameters() if not n.startswith("teacher.")]
    teacher = list(module.teacher.parameters()) if module.teacher is not None else []
    grads = [p.grad for p in student if p.grad is not None]
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim > 0]
    parts = {"student": local_bytes(student), "teacher": local_bytes(teacher), "grads": local_bytes(grads),
             "optimizer": local_bytes(state)}
    return {k: v / MIB for k, v in parts.items()}


def worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    from ssl.config import CONFIG_DIR
    from ssl.pretrain import build_module

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "trainer.strategy=fsdp", "run_dir=unused"])
    torch.manual_seed(0)
    module = build_module(cfg, num_samples=1000)
    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("data_parallel", "tensor_parallel"))
    module._device_mesh = mesh
    module.configure_model()
    torch.save(measure(module, cfg), f"{out}.{rank}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    args, overrides = parser.parse_known_args()
    from ssl.config import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[*overrides, "run_dir=unused"])
    from ssl.pretrain import build_module

    torch.manual_seed(0)
    full = measure(build_module(cfg, num_samples=1000), cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/sharding_memory_{os.getpid()}"
    mp.spawn(worker, args=(args.ranks, port, overrides, out), nprocs=args.ranks, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(args.ranks)]
    print(f"{' '.join(overrides)}; {args.ranks} ranks; MiB per rank")
    print("| | student params | teacher params | gradients | AdamW state | total |")
    print("|---|---|---|---|---|---|")
    for label, row in [("DDP (every rank)", full), *((f"FSDP rank {r}", x) for r, x in enumerate(ranks))]:
        cells = [row["student"], row["teacher"], row["grads"], row["optimizer"]]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + f" | {sum(cells):.1f} |")
    print(f"FSDP / DDP total on rank 0: {sum(ranks[0].values()) / sum(full.values()):.3f}")


if __name__ == "__main__":
    main()
