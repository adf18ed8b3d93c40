"""Linear probe on frozen features, with its learning rate chosen on the training set only.

As in DINOv2's linear evaluation, one linear layer per (lr, weight decay) grid point is trained
with SGD (momentum 0.9, cosine lr decay to 0) on the same mini-batches, all of them in one
vectorised pass. Unlike a pick of the best grid point on the validation set, the grid point is
chosen on a stratified held-out part of the TRAINING features; the chosen setting is then
retrained on all training features and scored once on the validation set.

Features are standardised with the mean / std of the features the classifier is fitted on (a
fixed affine map, so still a linear probe); the val set never contributes statistics.
Everything is deterministic given ``seed`` (initialisation, shuffling and the split).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F

from model.eval.knn import topk_accuracies

DEFAULT_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)
DEFAULT_WDS = (0.0, 1e-3)


@dataclass(frozen=True)
class ProbeConfig:
    """Grid and SGD settings of the probe."""

    lrs: tuple[float, ...] = DEFAULT_LRS
    weight_decays: tuple[float, ...] = DEFAULT_WDS
    epochs: int = 30
    min_steps: int = 300  # small training sets get more epochs, so every run takes at least this many steps
    batch_size: int = 256
    momentum: float = 0.9
    holdout_fraction: float = 0.2
    standardize: bool = True
    seed: int = 0
    num_threads: int | None = 1  # CPU threads while training (small matmuls; None = torch's setting)
    grid: list[tuple[float, float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.lrs or not self.weight_decays:
            raise ValueError("lrs and weight_decays must be non-empty")
        if self.epochs < 1 or self.batch_size < 1 or self.min_steps < 0:
            raise ValueError("epochs and batch_size must be >= 1, min_steps >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1 or None")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        object.__setattr__(self, "grid", [(float(lr), float(wd)) for wd in self.weight_decays for lr in self.lrs])


@dataclass
class LinearProbe:
    """Fitted classifier: ``logits = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # [C, D]
    bias: torch.Tensor  # [C]
    mean: torch.Tensor  # [D]
    std: torch.Tensor  # [D]

    def logits(self, feats: torch.Tensor) -> torch.Tensor:
        """Class scores ``[n, C]``."""
        return ((feats.detach().float().cpu() - self.mean) / self.std) @ self.weight.T + self.bias


def _standardizer(feats: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if not enabled:
        return torch.zeros(feats.shape[1], device=feats.device), torch.ones(feats.shape[1], device=feats.device)
    return feats.mean(0), feats.std(0, unbiased=False).clamp_min(1e-6)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch CPU threads (unchanged when None), restoring the previous setting."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_linear_grid(
    feats: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[tuple[float, float]],
    cfg: ProbeConfig,
) -> list[LinearProbe]:
    """One linear classifier per ``(lr, weight_decay)`` of ``grid``, trained together on ``feats`` only.

    Cross-entropy, SGD with momentum and coupled weight decay on the weights (not the biases),
    cosine lr decay over all steps; init N(0, 0.01²) weights, zero biases (DINOv2's). Runs on the
    features' device; the fitted probes live on the CPU.
    """
    if len(feats) != len(labels) or len(feats) == 0:
        raise ValueError("need as many labels as features, and at least one")
    with _threads(cfg.num_threads if feats.device.type == "cpu" else None):
        return _train_grid(feats.float(), labels.long().to(feats.device), num_classes, grid, cfg)


def _train_grid(
    x_all: torch.Tensor, y_all: torch.Tensor, num_classes: int, grid: Sequence[tuple[float, float]], cfg: ProbeConfig
) -> list[LinearProbe]:
    dev = x_all.device
    mean, std = _standardizer(x_all, cfg.standardize)
    x_all = (x_all - mean) / std
    g = torch.Generator().manual_seed(cfg.seed)
    n, d, n_grid = len(x_all), x_all.shape[1], len(grid)
    w = (torch.randn(n_grid, d, num_classes, generator=g) * 0.01).to(dev)
    b = torch.zeros(n_grid, 1, num_classes, device=dev)
    lrs = torch.tensor([lr for lr, _ in grid], device=dev).view(-1, 1, 1)
    wds = torch.tensor([wd for _, wd in grid], device=dev).view(-1, 1, 1)
    buf_w, buf_b = torch.zeros_like(w), torch.zeros_like(b)
    bs = min(cfg.batch_size, n)
    steps_per_epoch = math.ceil(n / bs)
    epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
    total, step = epochs * steps_per_epoch, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g).to(dev)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            x, y = x_all[idx], y_all[idx]
            w.requires_grad_(True)
            b.requires_grad_(True)
            logits = torch.matmul(x, w) + b  # [G, n, C]
            # sum over grid points of each one's mean loss: every classifier gets its own gradient
            loss = F.cross_entropy(logits.reshape(-1, num_classes), y.repeat(n_grid), reduction="sum") / len(y)
            gw, gb = torch.autograd.grad(loss, (w, b))
            with torch.no_grad():
                scale = 0.5 * (1 + math.cos(math.pi * step / total))
                buf_w = cfg.momentum * buf_w + gw + wds * w
                buf_b = cfg.momentum * buf_b + gb
                w = (w - lrs * scale * buf_w).detach()
                b = (b - lrs * scale * buf_b).detach()
            step += 1
    mean, std, w, b = mean.cpu(), std.cpu(), w.cpu(), b.cpu()
    return [LinearProbe(w[i].T.contiguous(), b[i, 0].clone(), mean, std) for i in range(n_grid)]


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(fit, holdout)``: about ``fraction`` of each class held out; a class of 1 stays in fit."""
    g = torch.Generator().manual_seed(seed)
    fit, hold = [], []
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_hold = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        hold.append(idx[:n_hold])
        fit.append(idx[n_hold:])
    return torch.cat(fit).sort().values, torch.cat(hold).sort().values


def select_hyperparams(
    train_feats: torch.Tensor, train_labels: torch.Tensor, num_classes: int, cfg: ProbeConfig
) -> tuple[tuple[float, float], list[dict[str, float]]]:
    """Best ``(lr, weight_decay)`` by top-1 on a held-out split of the TRAINING features, and the grid table.

    Ties go to the earlier grid point (grid order: weight decays outer, lrs inner, as configured).
    """
    if len(cfg.grid) == 1:
        return cfg.grid[0], []
    fit, hold = stratified_split(train_labels, cfg.holdout_fraction, cfg.seed)
    if len(hold) == 0:
        raise ValueError("too few training features to hold some out for the lr selection "
                         "(need a class with at least 2 images), or give a single (lr, weight decay)")
    probes = train_linear_grid(train_feats[fit], train_labels[fit], num_classes, cfg.grid, cfg)
    table = []
    for (lr, wd), probe in zip(cfg.grid, probes, strict=True):
        acc = topk_accuracies(probe.logits(train_feats[hold]), train_labels[hold])["top1"]
        table.append({"lr": lr, "weight_decay": wd, "holdout_top1": acc})
    best = max(range(len(table)), key=lambda i: (table[i]["holdout_top1"], -i))
    return cfg.grid[best], table


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    cfg: ProbeConfig | None = None,
) -> dict[str, Any]:
    """Choose (lr, wd) on train only, retrain on all train, report val accuracy (JSON-able dict)."""
    cfg = cfg or ProbeConfig()
    if train_feats.ndim != 2 or val_feats.ndim != 2 or train_feats.shape[1] != val_feats.shape[1]:
        raise ValueError("features must be 2-D with the same dimension for train and val")
    if len(val_feats) != len(val_labels):
        raise ValueError("val_feats and val_labels differ in length")
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    (lr, wd), table = select_hyperparams(train_feats, train_labels, num_classes, cfg)
    probe = train_linear_grid(train_feats, train_labels, num_classes, [(lr, wd)], cfg)[0]
    result: dict[str, Any] = dict(topk_accuracies(probe.logits(val_feats), val_labels))
    result["train_top1"] = topk_accuracies(probe.logits(train_feats), train_labels)["top1"]
    result.update(lr=lr, weight_decay=wd, selection=table)
    settings = asdict(cfg)
    settings.pop("grid", None)
    result["settings"] = settings
    return result
