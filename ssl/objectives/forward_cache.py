"""A per-step memo of backbone passes, so objectives sharing a view share its forward pass.

In a combination (objective=[a,b]) two objectives may encode the very same input tensors with the
same network (the student, or the shared teacher, on the same crops of the batch). The first
objective's output is reused by the second: one forward per distinct view. Student outputs keep
their graph, so both losses backpropagate through the one pass. Keys hold the network and input
tensors themselves (compared by identity) and a mode naming what is computed; the cache lives in
one step's StepContext, so nothing outlives the step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


class ForwardCache:
    def __init__(self) -> None:
        self._entries: list[tuple[Any, tuple[torch.Tensor, ...], str, Any]] = []
        self.hits = 0

    def get_or_compute(
        self, network: Any, inputs: Sequence[torch.Tensor], mode: str, compute: Callable[[], Any]
    ) -> Any:
        """`compute()` once per (network, identical input tensors, mode, grad mode) in a step."""
        key_inputs = tuple(inputs)
        mode = f"{mode}|grad={torch.is_grad_enabled()}"
        for net, cached_inputs, cached_mode, value in self._entries:
            if (net is network and cached_mode == mode and len(cached_inputs) == len(key_inputs)
                    and all(a is b for a, b in zip(cached_inputs, key_inputs))):
                self.hits += 1
                return value
        value = compute()
        self._entries.append((network, key_inputs, mode, value))
        return value
