"""CoKe's projection MLP and predictor (idstcv/CoKe `builder_*_view.py`).

Projection: Linear(D, H)-BN-ReLU-Linear(H, H)-BN-ReLU-Linear(H, out)-BN, replacing ResNet-50's fc
(H = D = 2048 there, out = 128). Predictor: Linear(out, H)-BN-ReLU-Linear(H, out). The official
hidden width is the encoder's own width, which is how the heads scale with the backbone
(ResNet-18: 512, ViT-S: 384) unless `hidden_dim` says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Three linear layers, each followed by BatchNorm (ReLU between them); the output is BN'd too."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim), nn.BatchNorm1d(out_dim),
    )


def predictor_mlp(dim: int, hidden_dim: int) -> nn.Sequential:
    """Linear-BN-ReLU-Linear back to `dim`: the extra branch whose output is classified too."""
    return nn.Sequential(
        nn.Linear(dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, dim),
    )


class CoKeHead(nn.Module):
    """Backbone vector -> (l2-normalised projection, l2-normalised prediction), both [B, out_dim]."""

    def __init__(self, in_dim: int, hidden_dim: int | None = None, out_dim: int = 128) -> None:
        super().__init__()
        hidden = int(hidden_dim) if hidden_dim else int(in_dim)
        self.projector = projection_mlp(in_dim, hidden, out_dim)
        self.predictor = predictor_mlp(out_dim, hidden)
        self.out_dim = out_dim

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        projection = self.projector(features)
        prediction = self.predictor(projection)
        return F.normalize(projection, dim=1), F.normalize(prediction, dim=1)
