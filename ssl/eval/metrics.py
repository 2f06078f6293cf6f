"""Top-k accuracy, shared by the k-NN classifier, both linear probes and the online callbacks."""

from __future__ import annotations

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)) -> dict:
    """Percent of rows whose label is among the top-k scores, for each k."""
    ranked = scores.argsort(dim=1, descending=True)
    out = {}
    for k in topk:
        hit = (ranked[:, : min(k, scores.shape[1])] == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * hit.float().mean().item()
    return out
