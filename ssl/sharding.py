"""`trainer.strategy=fsdp`: shard a large ViT's blocks with FSDP2 through Lightning.

Lightning's `ModelParallelStrategy` runs FSDP2 (`torch.distributed.fsdp.fully_shard`) and leaves the
sharding to the LightningModule's `configure_model`. Here every transformer block of the student
and of each EMA teacher becomes its own FSDP unit: parameters, gradients and optimizer state of the
blocks (well over 90% of a ViT) are split across ranks and gathered block by block in forward and
backward. The rest (patch embedding, position embedding, tokens, final norm, objective heads) stays
replicated and its gradients are averaged across ranks like DDP's. Why not shard the root module:
FSDP2 gathers a unit's parameters when its `forward` runs, and the objectives reach into the
backbone (patch embedding, mask tokens, visible-token encoders) without calling the root forward.

Teachers' blocks (one teacher, or one per distinct teacher setting of a combination) are sharded
exactly like the student's, so each EMA is an element-wise update of local shards with no
communication.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from pytorch_lightning.strategies import ModelParallelStrategy
from torch import nn

STRATEGY_NAMES = ("fsdp", "fsdp2")


class BlockShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism over every rank (no tensor parallelism), single-file checkpoints.

    Checkpoints gather full weights on rank 0, so they load in one process, resume on any number of
    ranks, and export like DDP checkpoints.
    """

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("save_distributed_checkpoint", False)
        super().__init__(**kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 parameter (a DTensor holding this rank's shard)."""
    return hasattr(tensor, "to_local") and hasattr(tensor, "placements")


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor (shares storage, so in-place updates stick)."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def transformer_blocks(backbone: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one; an error for backbones without them."""
    model = getattr(backbone, "model", backbone)
    blocks = getattr(model, "blocks", None)
    if not getattr(backbone, "is_vit", False) or blocks is None:
        raise ValueError(
            f"trainer.strategy=fsdp shards transformer blocks, and {type(model).__name__} has none; "
            "use trainer.strategy=ddp for convolutional backbones (they fit on one GPU anyway)."
        )
    return list(blocks)


@torch.no_grad()
def broadcast_from_rank0(module: nn.Module) -> None:
    """Start every rank from rank 0's weights, as DDP does (FSDP2 does not broadcast)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    for tensor in [*module.parameters(), *module.buffers()]:
        # gloo has no int16 / bool / bfloat16 kernels (CoKe's label memory is int16): widen exactly.
        wire = tensor.dtype
        if wire not in (torch.float32, torch.float64, torch.int32, torch.int64):
            wire = torch.float32 if tensor.is_floating_point() else torch.int64
        moved = tensor.data.to(device=device or tensor.device, dtype=wire)
        dist.broadcast(moved, src=0)
        tensor.data.copy_(moved)


def shard_modules(modules: Iterable[nn.Module], mesh: Any, root: nn.Module) -> None:
    """Broadcast `root` from rank 0, then make each of `modules` an FSDP2 unit.

    Each must be used through its `forward` (FSDP2 gathers a unit's weights there).
    """
    from torch.distributed.fsdp import fully_shard

    broadcast_from_rank0(root)
    for module in modules:
        fully_shard(module, mesh=mesh["data_parallel"])
        module.register_forward_hook(reshard_after_forward)


def reshard_after_forward(module: nn.Module, inputs: Any, output: Any) -> None:
    """Free the gathered weights as soon as the block has run.

    Each block is its own FSDP2 root (no sharded parent), and FSDP2 keeps a root's weights
    gathered after forward. The student's backward gathers them again block by block; the
    teacher's blocks (no backward) would otherwise stay whole until the EMA update.
    """
    module.reshard()


@torch.no_grad()
def average_replicated_gradients(params: Iterable[nn.Parameter]) -> None:
    """All-reduce (mean) the gradients FSDP2 does not already reduce: the unsharded parameters."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    grads = [p.grad for p in params if p.grad is not None and not is_sharded(p)]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


@torch.no_grad()
def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank's copy of the whole `module.state_dict()` with shards gathered (collective)."""
    return {
        name: (value.full_tensor() if is_sharded(value) else value).detach().cpu()
        for name, value in module.state_dict().items()
    }


def uses_block_sharding(trainer_cfg: Any) -> bool:
    """Whether `trainer.strategy` asks for FSDP (`fsdp` or `fsdp2`)."""
    return str(trainer_cfg.get("strategy", "auto")) in STRATEGY_NAMES
