"""DINO projection head: 3-layer MLP, 256-d bottleneck, L2-normalised, weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck), L2-normalise, weight-normed Linear(bottleneck -> K).

    `norm_last_layer=True` freezes the weight-norm magnitude g at 1, so every logit is a cosine
    similarity in [-1, 1] (the official default; False is recommended for ViT-S). The prototype
    layer keeps the substring `last_layer` in its parameter names so the epoch-0 freeze finds it.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(num_layers, 1) - 1) + [bottleneck_dim]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                if use_bn:
                    layers.append(nn.BatchNorm1d(b))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)
