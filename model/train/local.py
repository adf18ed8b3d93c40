"""Single-process DINOv2 training loop (no Ray): for tests, debugging and tiny runs.

image folder → ``ImageFolderDataset`` + ``DataAugmentationDINO`` → ``collate_data_and_cast``
(iBOT block masks) → ``SSLMetaArch.train_step`` with AdamW over the layer-wise param groups and
the config's schedules. Every step's loss terms, scheduled values and teacher statistics are kept
in the returned history.
"""
from __future__ import annotations

import functools
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from model.data.augmentations import DataAugmentationDINO
from model.data.collate import collate_data_and_cast
from model.data.datasets import ImageFolderDataset
from model.data.masking import MaskingGenerator
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


def build_augmentation(cfg: SSLConfig) -> DataAugmentationDINO:
    c = cfg.crops
    return DataAugmentationDINO(
        c.global_crops_scale,
        c.local_crops_scale,
        c.local_crops_number,
        c.global_crops_size,
        c.local_crops_size,
        blur_probs=c.blur_probs,
        solarize_prob=c.solarize_prob,
    )


def build_mask_generator(cfg: SSLConfig) -> MaskingGenerator:
    side = cfg.crops.global_crops_size // cfg.student.patch_size
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)


def build_collate(cfg: SSLConfig, seed: int) -> Callable[[list], dict[str, Any]]:
    gen = build_mask_generator(cfg)
    return functools.partial(
        collate_data_and_cast,
        mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
        mask_probability=cfg.ibot.mask_sample_probability,
        n_tokens=gen.num_patches,
        mask_generator=gen,
        rng=random.Random(seed),
    )


def build_data_loader(
    cfg: SSLConfig, image_folder: str | Path, *, seed: int, max_side: int | None = None, num_workers: int = 0
) -> DataLoader:
    dataset = ImageFolderDataset(image_folder, transform=build_augmentation(cfg), max_side=max_side)
    return DataLoader(
        dataset,
        batch_size=cfg.train.batch_size_per_gpu,
        sampler=InfiniteSampler(len(dataset), seed),
        collate_fn=build_collate(cfg, seed),
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
