"""Weighted k-nearest-neighbour classifier on frozen features (DINO's ``knn_classifier``).

Features are L2-normalised; similarity is cosine; the top-k neighbours vote for their
label with weight ``exp(similarity / T)`` (T = 0.07 as in DINO). The predicted class is the
one with the largest summed weight.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def _check(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("features must be 2-D [n, dim]")
    if len(train_feats) != len(train_labels):
        raise ValueError("train_feats and train_labels differ in length")
    if len(train_feats) == 0:
        raise ValueError("no training features")
    if train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"feature dims differ: train {train_feats.shape[1]}, test {test_feats.shape[1]}")


@torch.no_grad()
def knn_multi_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    ks: Sequence[int] = (10, 20),
    T: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict[int, torch.Tensor]:
    """Class scores ``[n_test, num_classes]`` for every k in ``ks`` from one top-max(k) search.

    The neighbours come sorted by similarity, so the top-k of each k is a prefix of the top-max(k).
    A k larger than the training set is clipped to its size.
    """
    _check(train_feats, train_labels, test_feats)
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max().item()) + 1
    kmax = min(max(ks), len(train_feats))
    train_n = F.normalize(train_feats.float(), dim=1)
    test_n = F.normalize(test_feats.float(), dim=1)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, len(test_n), chunk_size):
        sim = test_n[start : start + chunk_size] @ train_n.T  # [b, n_train]
        top_sim, top_idx = sim.topk(kmax, dim=1)  # sorted, largest first
        weights = (top_sim / T).exp()
        top_labels = train_labels[top_idx]
        for k in ks:
            kk = min(k, kmax)
            votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
            votes.scatter_add_(1, top_labels[:, :kk], weights[:, :kk])
            out[k].append(votes)
    return {k: torch.cat(v) if v else torch.zeros(0, num_classes) for k, v in out.items()}


def knn_scores(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """Class scores ``[n_test, num_classes]`` (summed ``exp(sim / T)`` of the top-k neighbours)."""
    return knn_multi_scores(train_feats, train_labels, test_feats, (k,), T, num_classes, chunk_size)[k]


def topk_accuracies(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """``{"top1": ...}`` plus ``"top5"`` when there are at least 5 classes; top-1 ties → smallest label."""
    labels = labels.long().to(scores.device)
    if len(labels) != len(scores):
        raise ValueError("scores and labels differ in length")
    if len(labels) == 0:
        raise ValueError("no samples to score")
    n = len(labels)
    out = {"top1": int((scores.argmax(dim=1) == labels).sum().item()) / n}
    if scores.shape[1] >= 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = int((top5 == labels[:, None]).any(dim=1).sum().item()) / n
    return out


def knn_evaluate(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    ks: Sequence[int] = (10, 20),
    T: float = 0.07,
    num_classes: int | None = None,
) -> dict[int, dict[str, float]]:
    """Top-1 (and top-5 with ≥ 5 classes) accuracy of the weighted kNN classifier for every k in ``ks``."""
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if len(test_labels) != len(test_feats):
        raise ValueError("test_feats and test_labels differ in length")
    scores = knn_multi_scores(train_feats, train_labels, test_feats, ks, T, num_classes)
    return {k: topk_accuracies(s, test_labels) for k, s in scores.items()}


def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Predicted labels ``[n_test]`` (ties → smallest label)."""
    return knn_scores(train_feats, train_labels, test_feats, k=k, T=T, num_classes=num_classes).argmax(dim=1)


def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    T: float = 0.07,
    num_classes: int | None = None,
) -> float:
    """Top-1 accuracy in [0, 1]."""
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    pred = knn_classify(train_feats, train_labels, test_feats, k=k, T=T, num_classes=num_classes)
    return float((pred == test_labels.long().to(pred.device)).float().mean().item()) if len(pred) else 0.0


@torch.no_grad()
def extract_features(backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """CLS features (``x_norm_clstoken``) of ``images [n, 3, H, W]`` in eval mode, float32 on CPU."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    try:
        feats = [
            backbone.forward_features(images[i : i + batch_size].to(device))["x_norm_clstoken"].float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat(feats) if feats else torch.zeros(0)
