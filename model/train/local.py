"""Single-process DINOv2 training loop (no Ray): for tests, debugging and tiny runs.

image folder → ``ImageFolderDataset`` + ``DataAugmentationDINO`` → ``collate_data_and_cast``
(iBOT block masks) → ``SSLMetaArch.train_step`` with AdamW over the layer-wise param groups and
the config's schedules. Every step's loss terms, scheduled values and teacher statistics are kept
in the returned history.
"""
from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from model.data.datasets import ImageFolderDataset
from model.data.recipe import build_augmentation, build_collate, build_mask_generator  # noqa: F401 - re-exported
from model.ssl.config import SSLConfig
from model.ssl.meta_arch import SSLMetaArch
from model.ssl.schedules import Schedules

log = logging.getLogger(__name__)


class InfiniteSampler(Sampler[int]):
    """Endless stream of indices: a fresh seeded permutation of the dataset per pass."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n = n
        self.seed = seed

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed)
        while True:
            yield from torch.randperm(self.n, generator=g).tolist()


def build_data_loader(
    cfg: SSLConfig, image_folder: str | Path, *, seed: int, max_side: int | None = None, num_workers: int = 0
) -> DataLoader:
    dataset = ImageFolderDataset(image_folder, transform=build_augmentation(cfg), max_side=max_side)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size_per_gpu,
        sampler=InfiniteSampler(len(dataset), seed),
        collate_fn=build_collate(cfg, random.Random(seed)),
        num_workers=num_workers,
        drop_last=True,
    )


@dataclass
class LocalTrainResult:
    history: list[dict[str, float]]
    model: SSLMetaArch
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[float]:
        return [h[key] for h in self.history]


def train_local(
    cfg: SSLConfig,
    image_folder: str | Path,
    steps: int,
    *,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    max_side: int | None = None,
    num_workers: int = 0,
    log_every: int = 50,
    model: SSLMetaArch | None = None,
    start_iteration: int = 0,
    on_step: Callable[[int, dict[str, float], SSLMetaArch], None] | None = None,
) -> LocalTrainResult:
    """Train ``steps`` iterations on the images under ``image_folder``; returns the per-step history.

    ``seed`` (default ``cfg.train.seed``) seeds torch (init, augmentation), the sampler and the masks.
    ``max_side`` downsizes images once when loaded (cheap augmentation for tests).
    """
    seed = cfg.train.seed if seed is None else seed
    torch.manual_seed(seed)
    random.seed(seed)
    if model is None:
        model = SSLMetaArch(cfg)
    model.to(device).train()
    optimizer = model.make_optimizer()
    schedules = Schedules.from_config(cfg)
    loader = build_data_loader(cfg, image_folder, seed=seed, max_side=max_side, num_workers=num_workers)

    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    batches = iter(loader)
    for it in range(start_iteration, start_iteration + steps):
        batch = next(batches)
        values = schedules.at(it)
        losses = model.train_step(batch, optimizer, values)
        record = {"iteration": float(it), **losses, **model.last_stats,
                  "lr": values.lr, "wd": values.wd, "momentum": values.momentum, "teacher_temp": values.teacher_temp}
        history.append(record)
        if on_step is not None:
            on_step(it, record, model)
        if log_every and (it % log_every == 0 or it == start_iteration + steps - 1):
            terms = " ".join(f"{k}={record[k]:.4f}" for k in ["total", *model.loss_terms.names] if k in record)
            log.info("it %d %s lr=%.2e teacher_temp=%.3f entropy=%.3f", it, terms, values.lr, values.teacher_temp,
                     record.get("teacher_entropy", float("nan")))
    return LocalTrainResult(history, model, optimizer, schedules, seconds=time.perf_counter() - t0)
