"""Class logits from a backbone's global vector: a linear layer, or an MLP with one hidden layer."""

from __future__ import annotations

from torch import nn

from ssl.errors import IncompatibleConfigError

HEADS = ("linear", "mlp")


def classifier_head(embed_dim: int, num_classes: int, kind: str, hidden_dim: int) -> nn.Module:
    """`linear`: Linear(D, C); `mlp`: Linear(D, hidden) -> GELU -> Linear(hidden, C)."""
    if kind == "linear":
        return nn.Linear(embed_dim, num_classes)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, num_classes))
    raise IncompatibleConfigError(f"objective.supervised.head={kind!r}; valid: {', '.join(HEADS)}")
