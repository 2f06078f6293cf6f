"""Weighted k-NN (cosine, exp(sim / T) votes) against a brute-force reference."""

import pytest
import torch
import torch.nn.functional as F

from ssl.eval.knn_classifier import knn_accuracy, knn_predict_scores
from ssl.eval.metrics import topk_accuracy


def brute_force_scores(train, labels, test, classes, k, t):
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    out = torch.zeros(test.shape[0], classes)
    for i, q in enumerate(test):
        sims = train @ q
        order = sims.argsort(descending=True)[:k]
        for j in order:
            out[i, labels[j]] += torch.exp(sims[j] / t)
    return out


def test_scores_match_brute_force_and_chunking() -> None:
    torch.manual_seed(0)
    train, labels, test = torch.randn(50, 6), torch.randint(0, 4, (50,)), torch.randn(13, 6)
    expected = brute_force_scores(train, labels, test, 4, 7, 0.07)
    got = knn_predict_scores(train, labels, test, 4, k=7, temperature=0.07, chunk_size=5)
    assert torch.allclose(got, expected, rtol=1e-4)


def test_separable_clusters_are_classified_perfectly() -> None:
    torch.manual_seed(0)
    centres = torch.eye(3) * 10
    train_y = torch.arange(3).repeat_interleave(20)
    train_x = centres[train_y] + torch.randn(60, 3)
    test_y = torch.arange(3).repeat(5)
    test_x = centres[test_y] + torch.randn(15, 3)
    result = knn_accuracy(train_x, train_y, test_x, test_y, k=5)
    assert result["top1"] == 100.0 and result["top5"] == 100.0


def test_topk_accuracy() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    labels = torch.tensor([2, 0])
    acc = topk_accuracy(scores, labels, (1, 2))
    assert acc["top1"] == pytest.approx(50.0) and acc["top2"] == pytest.approx(100.0)
