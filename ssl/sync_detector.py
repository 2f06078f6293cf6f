"""Find the host-device synchronisations of a training step, on any machine.

On a GPU, `.item()`, `bool(t)`, `.tolist()`, a copy to the host, a blocking copy from the host
(`torch.tensor(x, device=...)`), or an op whose output size depends on the data (nonzero,
boolean-mask indexing, unique, bincount, ...) makes the CPU wait until the GPU has run everything
queued before it; the GPU then idles while the CPU launches the next kernels. A
`TorchFunctionMode` sees these calls at the Python level, on CPU too, so a test can count them
without a GPU:

    with SyncDetector() as detector:
        training_step(...)
    print(detector.report())   # "file:line  kind" per call

It sees Python-level torch calls only: a sync inside a C++ kernel (e.g. a Python scalar argument
given as a tensor) or from `torch.cuda.synchronize` is not reported. On a CPU run every tensor
is on the host, so copies between devices cannot be told from no-ops; `.cpu()`, `.numpy()` and
`torch.tensor(data, device=...)` (any explicit device) are reported as the syncs they are on a GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

Tensor = torch.Tensor

# Calls that read a tensor's value on the host.
READS = {
    Tensor.item: "item",
    Tensor.tolist: "tolist",
    Tensor.__bool__: "bool",
    Tensor.__float__: "float",
    Tensor.__int__: "int",
    Tensor.__index__: "index",
    Tensor.__format__: "format",
    Tensor.cpu: "cpu",
    Tensor.numpy: "numpy",
    torch.equal: "equal",
    Tensor.equal: "equal",
    torch.allclose: "allclose",
    Tensor.allclose: "allclose",
    torch.is_nonzero: "is_nonzero",
    Tensor.is_nonzero: "is_nonzero",
}
# Ops whose output shape depends on the values: the host must know it before allocating.
DATA_DEPENDENT = {
    torch.nonzero: "nonzero",
    Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    Tensor.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    Tensor.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    Tensor.bincount: "bincount",
    torch.histc: "histc",
    Tensor.histc: "histc",
}
HOST_DATA = {torch.tensor: "tensor", torch.as_tensor: "as_tensor", torch.asarray: "asarray"}
INDEXING = {Tensor.__getitem__, Tensor.__setitem__, Tensor.index_put_, Tensor.index_put, torch.index_put}
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass(frozen=True)
class HostSync:
    """One call that would synchronise with a CUDA device, and the first caller outside torch."""

    kind: str
    where: str

    def __str__(self) -> str:
        return f"{self.where}  {self.kind}"


def has_bool_mask(index: Any) -> bool:
    """Whether an index (or one part of a tuple / list index) is a boolean tensor."""
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, Tensor) and p.dtype == torch.bool and p.dim() > 0 for p in parts)


def device_of(args: tuple, kwargs: dict) -> torch.device | None:
    """The target device of a `Tensor.to(...)` call, if it names one."""
    for value in (kwargs.get("device"), *args[1:]):
        if isinstance(value, (str, torch.device)):
            return torch.device(value)
        if isinstance(value, Tensor):
            return value.device
    return None


def sync_reason(func: Any, args: tuple, kwargs: dict) -> str | None:
    """The kind of host sync `func(*args, **kwargs)` forces on a GPU, or None."""
    try:
        kind = READS.get(func) or DATA_DEPENDENT.get(func)
    except TypeError:  # unhashable callables
        return None
    if kind:
        return kind
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if func is torch.repeat_interleave or func is Tensor.repeat_interleave:
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if len(args) == 1 else None)
        if isinstance(repeats, Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
    if func in INDEXING:
        index = args[1] if len(args) > 1 else kwargs.get("indices")
        if has_bool_mask(index):
            return "boolean mask indexing"
    if func in HOST_DATA and kwargs.get("device") is not None:
        data = args[0] if args else kwargs.get("data")
        if not (func is not torch.tensor and isinstance(data, Tensor)):
            return f"{HOST_DATA[func]}(host data, device=...)"
    if func is Tensor.new_tensor:
        return "new_tensor"
    if func is Tensor.to and args and isinstance(args[0], Tensor):
        target, source = device_of(args, kwargs), args[0].device
        if target is not None and target.type != source.type:
            if target.type == "cpu" or not kwargs.get("non_blocking", False):
                return f"to({target.type})"
    return None


def caller(skip_dirs: tuple[str, ...]) -> str:
    """`file:line` of the innermost frame outside torch and this module."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(skip_dirs):
            return f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


class SyncDetector(TorchFunctionMode):
    """Records every torch call that would make the host wait for a CUDA device (`syncs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[HostSync] = []
        self._skip = (TORCH_DIR, __file__)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        kind = sync_reason(func, args, kwargs)
        if kind is not None:
            self.syncs.append(HostSync(kind, caller(self._skip)))
        return func(*args, **kwargs)

    def clear(self) -> None:
        self.syncs.clear()

    def report(self) -> str:
        """One line per distinct call site with its count, most frequent first."""
        counts: dict[HostSync, int] = {}
        for sync in self.syncs:
            counts[sync] = counts.get(sync, 0) + 1
        lines = [f"{n:4d} x {sync}" for sync, n in sorted(counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines) or "no host syncs"
