"""The DINOv2 data recipe from an ``SSLConfig``: multi-crop augmentation, iBOT mask generator, collate.

One place for both input paths (the single-process loader in ``model.train.local`` and the Ray Data
stream in ``model.data.stream``); crop sizes can be overridden for the high-resolution phase.
"""
from __future__ import annotations

import random
from typing import Any, Callable

from model.data.augmentations import DataAugmentationDINO
from model.data.collate import collate_data_and_cast
from model.data.masking import MaskingGenerator
from model.ssl.config import SSLConfig


def build_augmentation(cfg: SSLConfig, global_size: int | None = None,
                       local_size: int | None = None) -> DataAugmentationDINO:
    """``DataAugmentationDINO`` from ``cfg.crops``, with the crop sizes overridden when given."""
    c = cfg.crops
    return DataAugmentationDINO(
        c.global_crops_scale,
        c.local_crops_scale,
        c.local_crops_number,
        c.global_crops_size if global_size is None else global_size,
        c.local_crops_size if local_size is None else local_size,
        blur_probs=c.blur_probs,
        solarize_prob=c.solarize_prob,
    )


def build_mask_generator(cfg: SSLConfig, global_size: int | None = None) -> MaskingGenerator:
    """iBOT block masks on the global crop's patch grid (``global_size // patch_size`` per side)."""
    size = cfg.crops.global_crops_size if global_size is None else global_size
    side = size // cfg.student.patch_size
    if side < 1:
        raise ValueError(f"global crop size {size} is smaller than the patch size {cfg.student.patch_size}")
    return MaskingGenerator(input_size=(side, side), max_num_patches=0.5 * side * side)


def build_collate(cfg: SSLConfig, rng: random.Random,
                  global_size: int | None = None) -> Callable[[list], dict[str, Any]]:
    """``samples -> collate_data_and_cast(samples, ...)`` with the config's iBOT settings; masks draw from ``rng``."""
    gen = build_mask_generator(cfg, global_size)

    def collate(samples: list) -> dict[str, Any]:
        return collate_data_and_cast(
            samples,
            mask_ratio_tuple=tuple(cfg.ibot.mask_ratio_min_max),
            mask_probability=cfg.ibot.mask_sample_probability,
            n_tokens=gen.num_patches,
            mask_generator=gen,
            rng=rng,
        )

    return collate
