"""Multi-crop batch collation with iBOT mask sampling, as facebookresearch/dinov2 ``dinov2/data/collate.py``."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from model.data.masking import MaskingGenerator, RandomSource, as_random

__all__ = ["collate_data_and_cast"]


def _stack_crops(samples_list: Sequence[Any], key: str, dtype: torch.dtype) -> Tensor:
    """Crop-major stack: crop 0 of every image, then crop 1 of every image, ..."""
    n_crops = len(samples_list[0][0][key])
    crops = [s[0][key][i] for i in range(n_crops) for s in samples_list]
    if not crops:
        return torch.empty(0, dtype=dtype)
    return torch.stack(crops).to(dtype)


def collate_data_and_cast(
    samples_list: Sequence[tuple[dict[str, Sequence[Tensor]], Any]],
    mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    dtype: torch.dtype = torch.float32,
    n_tokens: int | None = None,
    mask_generator: MaskingGenerator | None = None,
    rng: RandomSource = None,
) -> dict[str, Any]:
    """Stack the crops of ``(dict(global_crops=[...], local_crops=[...]), label)`` samples and sample iBOT masks.

    With ``B = n_global_crops * len(samples_list)`` global crops (crop-major), the first
    ``int(B * mask_probability)`` masks get a ratio drawn uniformly in consecutive bins of
    ``linspace(*mask_ratio_tuple, n_masked + 1)``, the others are empty, and the list is shuffled.
    ``n_tokens`` defaults to the generator's grid size; without a generator one is built for a square
    grid of ``n_tokens`` patches with ``max_num_patches = 0.5 * n_tokens`` (the official training
    setting). ``rng`` (see :mod:`model.data.masking`) drives the ratios, the shuffle and the masks;
    None uses the global ``random`` module for the first two and the generator's own source.

    Returns ``collated_global_crops [B, C, H, W]``, ``collated_local_crops [n_local * n_images, C, h, w]``
    (shape ``[0]`` when there are no local crops), ``collated_masks [B, N]`` bool,
    ``mask_indices_list [M]`` (indices into ``collated_masks.flatten()``), ``masks_weight [M]``,
    ``n_masked_patches`` (long tensor ``[1]`` holding M) and ``upperbound`` (int, >= M).
    """
    if mask_generator is None:
        if n_tokens is None:
            raise ValueError("collate_data_and_cast needs n_tokens or a mask_generator")
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"n_tokens={n_tokens} is not a square grid; pass a mask_generator")
        mask_generator = MaskingGenerator((side, side), max_num_patches=0.5 * n_tokens)
    N = mask_generator.num_patches if n_tokens is None else n_tokens
    if N != mask_generator.num_patches:
        raise ValueError(f"n_tokens={N} but the mask generator makes {mask_generator.num_patches} patches")
    draw = as_random(rng)
    mask_rng = None if rng is None else draw  # one stream for ratios, masks and shuffle

    collated_global_crops = _stack_crops(samples_list, "global_crops", dtype)
    collated_local_crops = _stack_crops(samples_list, "local_crops", dtype)

    B = len(collated_global_crops)
    n_samples_masked = int(B * mask_probability)
    # float32 tensors and draws as in the official code, so seeded runs give the official masks
    probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
    upperbound = 0
    masks_list = []
    for i in range(n_samples_masked):
        prob_min, prob_max = probs[i], probs[i + 1]
        n_masked = int(N * draw.uniform(prob_min, prob_max))
        masks_list.append(torch.from_numpy(mask_generator(n_masked, rng=mask_rng)))
        upperbound += int(N * prob_max)
    for _ in range(n_samples_masked, B):
        masks_list.append(torch.from_numpy(mask_generator(0, rng=mask_rng)))
    draw.shuffle(masks_list)

    collated_masks = torch.stack(masks_list).flatten(1)
    mask_indices_list = collated_masks.flatten().nonzero().flatten()
    masks_weight = (1 / collated_masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(collated_masks)[collated_masks]

    return {
        "collated_global_crops": collated_global_crops,
        "collated_local_crops": collated_local_crops,
        "collated_masks": collated_masks,
        "mask_indices_list": mask_indices_list,
        "masks_weight": masks_weight,
        "upperbound": upperbound,
        "n_masked_patches": torch.full((1,), fill_value=mask_indices_list.shape[0], dtype=torch.long),
    }
