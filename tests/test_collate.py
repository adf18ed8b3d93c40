"""collate_data_and_cast: crop stacking order, mask ratios/bins, derived index tensors, determinism."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from model.data.collate import collate_data_and_cast
from model.data.masking import MaskingGenerator

N_IMAGES, N_LOCAL = 3, 2
GRID = 4  # 4 x 4 = 16 patch tokens per global crop


def make_samples(n_images: int = N_IMAGES, n_local: int = N_LOCAL):
    """Crops filled with a code value: 100 * image + 10 * crop (+ 1 for local crops)."""
    samples = []
    for b in range(n_images):
        glob = [torch.full((3, 8, 8), 100.0 * b + 10 * i) for i in range(2)]
        loc = [torch.full((3, 4, 4), 100.0 * b + 10 * i + 1) for i in range(n_local)]
        samples.append(({"global_crops": glob, "local_crops": loc}, b))
    return samples


def collate(**kw):
    kw.setdefault("mask_generator", MaskingGenerator(GRID, max_num_patches=8))
    return collate_data_and_cast(make_samples(), mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, **kw)


def test_crop_stacking_crop_major_and_dtype() -> None:
    out = collate(rng=0, dtype=torch.bfloat16)
    g, l = out["collated_global_crops"], out["collated_local_crops"]
    assert g.shape == (6, 3, 8, 8) and l.shape == (6, 3, 4, 4)
    assert g.dtype == l.dtype == torch.bfloat16
    # crop-major: index i * n_images + b holds crop i of image b
    assert [int(x[0, 0, 0]) for x in g] == [0, 100, 200, 10, 110, 210]
    assert [int(x[0, 0, 0]) for x in l] == [1, 101, 201, 11, 111, 211]


def test_mask_bins_upperbound_and_derived_tensors() -> None:
    # B = 6 global crops, mask_probability 0.5 -> 3 masked crops; linspace(0.1, 0.5, 4) =
    # [0.1, 0.2333, 0.3667, 0.5]: ratios in each bin give int(16 * u) patches, u in the bin, so
    # at most 3, 5 and 8 patches; upperbound = int(16 * .2333) + int(16 * .3667) + int(16 * .5) = 3 + 5 + 8 = 16
    for seed in range(20):
        out = collate(rng=seed)
        masks = out["collated_masks"]
        assert masks.shape == (6, 16) and masks.dtype == torch.bool
        counts = sorted(masks.sum(-1).tolist())
        assert counts[:3] == [0, 0, 0]  # 3 crops stay unmasked
        assert counts[3] <= 8 and counts[4] <= 8 and counts[5] <= 8
        assert sum(counts) <= out["upperbound"] == 16
        idx = out["mask_indices_list"]
        assert torch.equal(idx, masks.flatten().nonzero().flatten())
        assert out["n_masked_patches"].tolist() == [idx.numel()] and out["n_masked_patches"].dtype == torch.long
        # weight of a masked patch = 1 / masked patches of its crop; they sum to the number of masked crops
        per_crop = masks.sum(-1)
        owner = idx // 16
        assert torch.allclose(out["masks_weight"], 1.0 / per_crop[owner].float())
        assert abs(out["masks_weight"].sum().item() - int((per_crop > 0).sum())) < 1e-5


def test_ratio_bins_are_respected() -> None:
    # a big grid so that blocks fill their targets: the smallest masked crop is in the first bin
    gen = MaskingGenerator(16, max_num_patches=128)
    seen = []
    for seed in range(10):
        out = collate_data_and_cast(make_samples(4, 0), (0.1, 0.5), 0.5, n_tokens=256, mask_generator=gen, rng=seed)
        counts = sorted(c for c in out["collated_masks"].sum(-1).tolist() if c > 0)
        # 8 crops, 4 masked; bins [.1,.2], [.2,.3], [.3,.4], [.4,.5] of 256 tokens -> targets <= 51, 76, 102, 128
        assert len(counts) <= 4 and counts[-1] <= 128
        seen.append(counts)
        assert out["upperbound"] == 51 + 76 + 102 + 128
        assert out["collated_local_crops"].shape == (0,)
    assert np.mean([c[0] for c in seen]) < np.mean([c[-1] for c in seen])


def test_deterministic_given_seed_and_official_stream() -> None:
    a, b = collate(rng=random.Random(5)), collate(rng=random.Random(5))
    assert torch.equal(a["collated_masks"], b["collated_masks"])
    assert torch.equal(collate(rng=np.random.default_rng(1))["collated_masks"], collate(rng=np.random.default_rng(1))["collated_masks"])
    masks = {tuple(collate(rng=s)["collated_masks"].flatten().tolist()) for s in range(5)}
    assert len(masks) > 1
    # rng=None uses the global random module (official): seeding it reproduces rng=random.Random(seed)
    random.seed(5)
    c = collate(rng=None)
    assert torch.equal(c["collated_masks"], a["collated_masks"])


def test_default_generator_from_n_tokens_and_errors() -> None:
    out = collate_data_and_cast(make_samples(), n_tokens=16, rng=0)
    assert out["collated_masks"].shape == (6, 16)
    with pytest.raises(ValueError):
        collate_data_and_cast(make_samples(), n_tokens=15)
    with pytest.raises(ValueError):
        collate_data_and_cast(make_samples())
    with pytest.raises(ValueError):
        collate_data_and_cast(make_samples(), n_tokens=25, mask_generator=MaskingGenerator(4))


def test_equals_official_collate_for_the_same_seed() -> None:
    from test_masking import official_generator

    def official_collate(samples_list, mask_ratio_tuple, mask_probability, n_tokens, mask_generator):
        """Transcription of the official mask sampling (global `random`)."""
        B = 2 * len(samples_list)
        n_samples_masked = int(B * mask_probability)
        probs = torch.linspace(*mask_ratio_tuple, n_samples_masked + 1)
        upperbound, masks_list = 0, []
        for i in range(0, n_samples_masked):
            prob_min, prob_max = probs[i], probs[i + 1]
            masks_list.append(torch.BoolTensor(mask_generator(int(n_tokens * random.uniform(prob_min, prob_max)))))
            upperbound += int(n_tokens * prob_max)
        for _ in range(n_samples_masked, B):
            masks_list.append(torch.BoolTensor(mask_generator(0)))
        random.shuffle(masks_list)
        return torch.stack(masks_list).flatten(1), upperbound

    samples = make_samples(8, 1)
    for seed in range(3):
        random.seed(seed)
        ref_masks, ref_upper = official_collate(samples, (0.1, 0.5), 0.5, 196, official_generator(14, 14, None, max_num_patches=98))
        out = collate_data_and_cast(samples, (0.1, 0.5), 0.5, mask_generator=MaskingGenerator(14, max_num_patches=98), rng=random.Random(seed))
        assert torch.equal(out["collated_masks"], ref_masks) and out["upperbound"] == ref_upper
