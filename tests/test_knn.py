"""DINO-style weighted kNN on hand-made features."""
from __future__ import annotations

import math

import pytest
import torch

from model.eval.knn import knn_accuracy, knn_classify, knn_evaluate, knn_multi_scores, knn_scores, topk_accuracies


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


def test_multi_k_from_one_search_by_hand():
    # query [1, 0]; neighbours by cosine: a (1.0, label 0), b (0.6, label 1), c (0.0, label 1)
    train = torch.tensor([[3.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    labels = torch.tensor([0, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    out = knn_multi_scores(train, labels, q, ks=(1, 2, 10), T=0.5, num_classes=2)
    e = math.exp
    torch.testing.assert_close(out[1], torch.tensor([[e(2.0), 0.0]]))
    torch.testing.assert_close(out[2], torch.tensor([[e(2.0), e(1.2)]]))
    torch.testing.assert_close(out[10], torch.tensor([[e(2.0), e(1.2) + e(0.0)]]))  # k clipped to 3
    for k in (1, 2, 10):  # the single search equals one search per k
        torch.testing.assert_close(out[k], knn_scores(train, labels, q, k=k, T=0.5, num_classes=2))


def test_one_topk_call_for_all_k(monkeypatch: pytest.MonkeyPatch):
    calls = []
    real = torch.Tensor.topk

    def spy(self, k, *args, **kwargs):
        calls.append(k)
        return real(self, k, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "topk", spy)
    g = torch.Generator().manual_seed(0)
    knn_multi_scores(torch.randn(30, 4, generator=g), torch.arange(30) % 3, torch.randn(5, 4, generator=g), ks=(10, 20))
    assert calls == [20]


def test_top1_top5_by_hand():
    # six classes, one training point each on its own axis; the query is nearest to 0, then 1, 2, 3, 4; 5 is last
    train = torch.eye(6)
    labels = torch.arange(6)
    q = torch.tensor([1.0, 0.5, 0.4, 0.3, 0.2, 0.0])
    test = q.repeat(3, 1)
    truth = torch.tensor([0, 4, 5])  # top-1 hit; top-5 hit only; both miss
    res = knn_evaluate(train, labels, test, truth, ks=(10, 20))
    assert res == {10: {"top1": 1 / 3, "top5": 2 / 3}, 20: {"top1": 1 / 3, "top5": 2 / 3}}
    assert topk_accuracies(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])) == {"top1": 0.5}  # < 5 classes


def test_knn_errors():
    train, labels = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="dims differ"):
        knn_multi_scores(train, labels, torch.randn(2, 5))
    with pytest.raises(ValueError, match="positive"):
        knn_multi_scores(train, labels, torch.randn(2, 3), ks=(0,))
    with pytest.raises(ValueError, match="no training"):
        knn_multi_scores(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), torch.randn(2, 3))
    with pytest.raises(ValueError, match="length"):
        knn_evaluate(train, labels, torch.randn(2, 3), torch.tensor([0]))
