"""The supervised loss of mixed pretraining: only labelled rows count, and nothing else leaks in."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl.losses.supervised import labelled_accuracy, masked_cross_entropy


def test_known_value_is_the_mean_over_labelled_rows() -> None:
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]])
    labels = torch.tensor([0, -1, 1])
    expected = (math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(10.0))) / 2
    torch.testing.assert_close(masked_cross_entropy(logits, labels), torch.tensor(expected))


def test_label_smoothing_matches_torch_on_the_labelled_rows() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(6, 4, generator=g), torch.tensor([3, -1, 0, -1, 2, 1])
    keep = labels >= 0
    expected = F.cross_entropy(logits[keep], labels[keep], label_smoothing=0.1)
    torch.testing.assert_close(masked_cross_entropy(logits, labels, 0.1), expected)


def test_unlabelled_rows_get_exactly_zero_gradient_and_do_not_change_the_loss() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(5, 8, generator=g, requires_grad=True)
    head = torch.nn.Linear(8, 3)
    labels = torch.tensor([1, -1, 2, -1, 0])
    loss = masked_cross_entropy(head(features), labels, 0.1)
    loss.backward()
    assert torch.equal(features.grad[labels < 0], torch.zeros(2, 8))
    assert (features.grad[labels >= 0].abs().sum(dim=1) > 0).all()

    # Another image (features) and another negative label in the unlabelled rows: the same loss.
    other = features.detach().clone()
    other[labels < 0] = 1e3 * torch.randn(2, 8, generator=g)
    relabelled = torch.tensor([1, -7, 2, -2, 0])
    torch.testing.assert_close(masked_cross_entropy(head(other), relabelled, 0.1), loss.detach())


def test_a_batch_without_labels_gives_zero_attached_to_the_graph() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    loss = masked_cross_entropy(logits, torch.full((4,), -1))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))


def test_accuracy_counts_labelled_rows_only() -> None:
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    labels = torch.tensor([0, 1, -1, -1])
    assert labelled_accuracy(logits, labels).item() == 0.5
    assert labelled_accuracy(logits, torch.full((4,), -1)).item() == 0.0
