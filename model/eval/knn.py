"""Weighted k-nearest-neighbour classifier on frozen features (DINO's ``knn_classifier``).

Features are L2-normalised; similarity is cosine; the top-k neighbours vote for their
label with weight ``exp(similarity / T)`` (T = 0.07 as in DINO). The predicted class is the
one with the largest summed weight.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
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
    if train_feats.ndim != 2 or test_feats.ndim != 2:
        raise ValueError("features must be 2-D [n, dim]")
    if len(train_feats) != len(train_labels):
        raise ValueError("train_feats and train_labels differ in length")
    train_labels = train_labels.long()
    if num_classes is None:
        num_classes = int(train_labels.max().item()) + 1
    k = min(k, len(train_feats))
    train_n = F.normalize(train_feats.float(), dim=1)
    test_n = F.normalize(test_feats.float(), dim=1)
    out = []
    for start in range(0, len(test_n), chunk_size):
        sim = test_n[start : start + chunk_size] @ train_n.T  # [b, n_train]
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / T).exp()
        votes = torch.zeros(len(sim), num_classes, dtype=weights.dtype, device=weights.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        out.append(votes)
    return torch.cat(out) if out else torch.zeros(0, num_classes)


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
