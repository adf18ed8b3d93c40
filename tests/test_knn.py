"""DINO-style weighted kNN on hand-made features."""
from __future__ import annotations

import math

import pytest
import torch

from model.eval.knn import knn_accuracy, knn_classify, knn_scores


def test_weighted_vote_beats_majority():
    # query [1, 0]: one label-0 neighbour at cosine 1, two label-1 neighbours at cosine 0
    train = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]])  # norms differ: cosine only
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    scores = knn_scores(train, labels, q, k=3, T=0.07, num_classes=2)
    torch.testing.assert_close(scores, torch.tensor([[math.exp(1 / 0.07), 2.0]]))
    assert knn_classify(train, labels, q, k=3, T=0.07).tolist() == [0]
    # a very high temperature makes the weights ~equal: majority wins
    assert knn_classify(train, labels, q, k=3, T=100.0).tolist() == [1]
    # k=1: only the nearest counts
    torch.testing.assert_close(knn_scores(train, labels, q, k=1, T=0.5, num_classes=3), torch.tensor([[math.exp(2.0), 0, 0]]))


def test_accuracy_two_clusters():
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    test = torch.tensor([[1.0, 0.2], [0.2, 1.0], [1.0, 0.1]])
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 0]), k=2) == 1.0
    assert knn_accuracy(train, labels, test, torch.tensor([0, 1, 1]), k=2) == pytest.approx(2 / 3)
    # k larger than the training set is clipped
    assert knn_classify(train, labels, test, k=20).tolist() == [0, 1, 0]


def test_chunking_is_transparent():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(50, 8, generator=g), torch.randn(33, 8, generator=g)
    labels = torch.randint(0, 4, (50,), generator=g)
    a = knn_scores(train, labels, test, k=5, num_classes=4, chunk_size=7)
    b = knn_scores(train, labels, test, k=5, num_classes=4)
    torch.testing.assert_close(a, b)
