"""Online kNN monitoring of the teacher during training (every ``KnnMonitor.every`` steps).

The labelled train/val folders are decoded and transformed once per worker (at most
``max_images`` each, a deterministic class-stratified subset). Features are computed by all
workers together — the backbone is sharded, so every worker runs the same number of forward
passes on its slice of the images — and gathered; the kNN vote (cosine, ``exp(sim/T)``) runs on
every worker so all of them log the same number.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import Tensor, nn

from model.data.datasets import ImageFolderDataset
from model.eval.knn import knn_classify
from model.train.job import KnnMonitor


def _subset(targets: list[int], limit: int) -> list[int]:
    """Round-robin over classes so a capped subset keeps every class."""
    by_class: dict[int, list[int]] = {}
    for i, t in enumerate(targets):
        by_class.setdefault(t, []).append(i)
    out: list[int] = []
    queues = [list(v) for _, v in sorted(by_class.items())]
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return sorted(out)


def load_split(folder: str, transform: Callable, limit: int) -> tuple[Tensor, Tensor, list[str]]:
    """Transformed images ``[N, 3, H, W]``, labels ``[N]`` and class names of an ImageFolder."""
    ds = ImageFolderDataset(folder, transform=transform, cache=False)
    if not ds.classes:
        raise ValueError(f"{folder} has no class sub-folders: online kNN needs an ImageFolder layout (root/<class>/<image>)")
    idx = _subset(ds.targets, limit)
    images = torch.stack([ds[i][0] for i in idx])
    labels = torch.tensor([ds.targets[i] for i in idx])
    return images, labels, ds.classes


@torch.no_grad()
def distributed_features(backbone: nn.Module, images: Tensor, batch_size: int, autocast: Callable) -> Tensor:
    """CLS features of ``images`` computed jointly by every worker (same number of passes each), gathered."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    n = len(images)
    per_rank = -(-n // world)
    steps = -(-per_rank // batch_size)
    device = next(backbone.parameters()).device
    mine = images[rank * per_rank : (rank + 1) * per_rank]
    feats = []
    for s in range(steps):
        chunk = mine[s * batch_size : (s + 1) * batch_size]
        if len(chunk) == 0:  # keep the collective pattern identical on every worker
            chunk = images[:1]
        with autocast():
            out = backbone.forward_features(chunk.to(device))["x_norm_clstoken"].float()
        feats.append(out[: len(mine[s * batch_size : (s + 1) * batch_size])].cpu())
    local = torch.cat(feats) if feats else torch.zeros(0, 0)
    if world == 1:
        return local
    gathered: list = [None] * world
    dist.all_gather_object(gathered, local)
    return torch.cat([g for g in gathered if g is not None and len(g)])[:n]


class OnlineKnn:
    """Teacher kNN top-1 on a labelled pair of folders; ``due(step)`` says when to measure."""

    def __init__(self, settings: KnnMonitor, transform: Callable, batch_size: int = 64) -> None:
        self.settings = settings
        self.batch_size = batch_size
        self.train_images, self.train_labels, classes = load_split(settings.train_dir, transform, settings.max_images)
        self.val_images, self.val_labels, val_classes = load_split(settings.val_dir, transform, settings.max_images)
        if val_classes != classes:
            raise ValueError(f"kNN monitor: {settings.val_dir} classes {val_classes} differ from {settings.train_dir} "
                             f"classes {classes}")
        self.num_classes = len(classes)

    def due(self, step: int, last_step: int) -> bool:
        every = self.settings.every
        return every > 0 and ((step + 1) % every == 0 or step == last_step)

    def measure(self, backbone: nn.Module, autocast: Callable) -> float:
        """Top-1 accuracy of the weighted kNN (cosine, ``exp(sim/T)``) on the val split."""
        was_training = backbone.training
        backbone.eval()
        try:
            train = distributed_features(backbone, self.train_images, self.batch_size, autocast)
            val = distributed_features(backbone, self.val_images, self.batch_size, autocast)
        finally:
            backbone.train(was_training)
        pred = knn_classify(train, self.train_labels, val, k=self.settings.k, T=self.settings.temperature,
                            num_classes=self.num_classes)
        return float((pred == self.val_labels).float().mean())
