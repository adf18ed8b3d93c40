"""One evaluation run: features of a train and a val ImageFolder, then kNN and/or a linear probe → JSON-able dict.

The kNN classifier uses the CLS token (DINO/DINOv2 practice); the linear probe uses ``linear_pooling``
("cls" by default, "cls+avgpool" as in DINOv2's linear evaluation). Features are extracted once;
when the probe wants "cls+avgpool" the kNN reads the CLS half of the same features.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from model.eval.features import default_resize, extract_features
from model.eval.knn import knn_evaluate
from model.eval.linear import ProbeConfig, linear_probe
from model.export import write_json_atomic

METHODS = ("knn", "linear")


def evaluate_features(
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    num_classes: int,
    *,
    methods: Sequence[str] = METHODS,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    probe: ProbeConfig | None = None,
    knn_dim: int | None = None,
) -> dict[str, Any]:
    """kNN / linear results on precomputed ``(features, labels)``; kNN uses the first ``knn_dim`` columns."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown eval methods {unknown}; expected some of {METHODS}")
    (xtr, ytr), (xva, yva) = train, val
    results: dict[str, Any] = {}
    if "knn" in methods:
        t0 = time.perf_counter()
        d = knn_dim or xtr.shape[1]
        accs = knn_evaluate(xtr[:, :d], ytr, xva[:, :d], yva, ks=ks, T=temperature, num_classes=num_classes)
        results["knn"] = {
            "temperature": temperature,
            "similarity": "cosine",
            "feature_dim": d,
            "k": {str(k): {**acc, "k_used": min(k, len(xtr))} for k, acc in accs.items()},
            "seconds": time.perf_counter() - t0,
        }
    if "linear" in methods:
        t0 = time.perf_counter()
        res = linear_probe(xtr, ytr, xva, yva, num_classes=num_classes, cfg=probe)
        results["linear"] = {**res, "feature_dim": xtr.shape[1], "seconds": time.perf_counter() - t0}
    return results


def evaluate(
    backbone: nn.Module,
    train_dir: str | Path,
    val_dir: str | Path,
    *,
    methods: Sequence[str] = METHODS,
    ks: Sequence[int] = (10, 20),
    temperature: float = 0.07,
    crop_size: int = 224,
    resize: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    bf16: bool = False,
    linear_pooling: str = "cls",
    probe: ProbeConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a frozen backbone on ``train_dir`` / ``val_dir`` (``<dir>/<class>/<image>``) → JSON-able dict.

    Keys: ``n_train``, ``n_val``, ``n_classes``, ``classes``, ``feature_dim`` (of the backbone's CLS),
    ``crop_size``, ``resize``, ``seconds`` (total and feature extraction), and one entry per method:
    ``knn`` → ``k`` → ``{"10": {"top1", "top5"?, "k_used"}, ...}``; ``linear`` → top1/top5, chosen lr
    and weight decay, the selection table (held-out part of train) and settings.
    Val classes must be among the train classes; labels follow the train class order.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"unknown eval methods {unknown}; expected some of {METHODS}")
    pooling = "cls+avgpool" if "linear" in methods and linear_pooling == "cls+avgpool" else "cls"
    if linear_pooling not in ("cls", "cls+avgpool"):
        raise ValueError(f"linear_pooling must be 'cls' or 'cls+avgpool', got {linear_pooling!r}")
    opts = dict(crop_size=crop_size, resize=resize, batch_size=batch_size, device=device,
                num_workers=num_workers, pooling=pooling, bf16=bf16)
    t0 = time.perf_counter()
    xtr, ytr, classes = extract_features(backbone, train_dir, **opts)
    xva, yva, _ = extract_features(backbone, val_dir, classes=classes, **opts)
    t_feat = time.perf_counter() - t0
    cls_dim = xtr.shape[1] // 2 if pooling == "cls+avgpool" else xtr.shape[1]
    results = evaluate_features((xtr, ytr), (xva, yva), len(classes), methods=methods, ks=ks,
                                temperature=temperature, probe=probe, knn_dim=cls_dim)
    if "linear" in results:
        results["linear"]["pooling"] = linear_pooling
    return {
        "train_dir": str(train_dir),
        "val_dir": str(val_dir),
        "n_train": len(ytr),
        "n_val": len(yva),
        "n_classes": len(classes),
        "classes": classes,
        "feature_dim": cls_dim,
        "crop_size": crop_size,
        "resize": default_resize(crop_size) if resize is None else resize,
        **results,
        "seconds": {"features": t_feat, "total": time.perf_counter() - t0},
    }


def write_results(path: str | Path, results: dict[str, Any]) -> Path:
    """Write evaluation results as JSON atomically (temporary name, then rename)."""
    return write_json_atomic(path, results)
