"""Weighted k-NN classification on L2-normalised features (the DINO protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ssl.eval.metrics import topk_accuracy


@torch.no_grad()
def knn_predict_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores [N_test, C]: each of the k nearest (cosine) neighbours votes exp(sim / T).

    Features are L2-normalised here, so callers may pass raw embeddings. Test rows are processed
    in chunks to bound memory at chunk_size x N_train similarities.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    scores = []
    for start in range(0, test.shape[0], chunk_size):
        sims = test[start : start + chunk_size] @ train.T
        top_sims, top_idx = sims.topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], (top_sims / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


@torch.no_grad()
def knn_grid_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperatures: Sequence[float] = (0.07,),
    chunk_size: int = 1024,
) -> dict[tuple[int, float], torch.Tensor]:
    """Class scores for every (k, T) of a grid from one similarity pass.

    The max(ks) nearest neighbours of each test chunk are found once (sorted, so the k nearest
    are a prefix) and every (k, T) votes from them: equal to `knn_predict_scores` per pair.
    """
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    ks = list(dict.fromkeys(min(int(k), train.shape[0]) for k in ks))  # k beyond the bank: scored once
    widest = max(ks)
    scores: dict[tuple[int, float], list[torch.Tensor]] = {(k, t): [] for k in ks for t in temperatures}
    for start in range(0, test.shape[0], chunk_size):
        top_sims, top_idx = (test[start : start + chunk_size] @ train.T).topk(widest, dim=1)
        neighbour_labels = train_labels[top_idx]
        for t in temperatures:
            weights = (top_sims / t).exp()
            for k in ks:
                votes = torch.zeros(top_sims.shape[0], num_classes, device=top_sims.device)
                votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])
                scores[(k, t)].append(votes)
    return {key: torch.cat(chunks) for key, chunks in scores.items()}


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
) -> dict:
    """Top-1 / top-5 accuracy (%) of the weighted k-NN classifier."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return topk_accuracy(scores, test_labels)
