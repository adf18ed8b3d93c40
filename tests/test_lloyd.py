"""Spherical k-means as per-shard partial sums (pipeline/vectors/lloyd.py): exact reduction, shard- and
order-independence, deterministic empty-cluster refill, hash sampling, and agreement with FAISS."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.vectors.kmeans import normalise as unit_rows
from pipeline.vectors.lloyd import (SCALE, Partial, nearest, partial_stats, sample_keys, smallest_keys,
                                    update_centroids)


def planted(n: int = 3000, k: int = 12, d: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.standard_normal((k, d)))
    labels = rng.integers(0, k, n)
    return unit_rows(centres[labels] + 0.15 * rng.standard_normal((n, d))), labels


def lloyd(x: np.ndarray, init: np.ndarray, niter: int, shard_rows: int, order_seed: int | None = None,
          seed: int = 0) -> tuple[np.ndarray, list[float]]:
    """The sharded iteration as the cluster stage drives it, with shards summed in any order."""
    c, objective = init.copy(), []
    bounds = list(range(0, len(x), shard_rows))
    for it in range(niter):
        parts = [partial_stats(x[b:b + shard_rows], c)[0] for b in bounds]
        if order_seed is not None:
            parts = [parts[i] for i in np.random.default_rng([order_seed, it]).permutation(len(parts))]
        total = Partial.zeros(*c.shape)
        for p in parts:
            total = total + p
        objective.append(total.mean_similarity())
        c, _ = update_centroids(c, total, seed, it)
    return c, objective


def test_result_does_not_depend_on_shard_size_or_reduction_order() -> None:
    x, _ = planted()
    init = x[:12].copy()
    a, obj_a = lloyd(x, init, 8, shard_rows=len(x))
    b, obj_b = lloyd(x, init, 8, shard_rows=97, order_seed=1)
    c, obj_c = lloyd(x, init, 8, shard_rows=1000, order_seed=2)
    assert np.array_equal(a, b) and np.array_equal(a, c)  # bit for bit
    assert obj_a == obj_b == obj_c
    assert all(later >= earlier - 1e-9 for earlier, later in zip(obj_a, obj_a[1:]))  # Lloyd never gets worse


def test_agrees_with_faiss_from_the_same_initialisation() -> None:
    import faiss

    x, _ = planted(n=2000, k=8, d=16, seed=3)
    init = x[:8].copy()
    ours, objective = lloyd(x, init, 10, shard_rows=300)
    km = faiss.Kmeans(16, 8, niter=10, spherical=True, max_points_per_centroid=10_000, min_points_per_centroid=1)
    km.train(x, init_centroids=init)
    theirs = unit_rows(km.centroids)
    assert np.abs(ours - theirs).max() < 1e-4
    a, _ = nearest(x, ours)
    b, _ = nearest(x, theirs)
    assert (a == b).mean() > 0.999
    sim = (x * theirs[b]).sum(1).mean()
    assert abs(objective[-1] - sim) < 1e-3


def test_fixed_point_sums_are_exact_and_counts_match() -> None:
    x, _ = planted(n=500, k=4, d=8)
    c = x[:4]
    part, assign, sim = partial_stats(x, c)
    assert part.rows == 500 and np.array_equal(part.counts, np.bincount(assign, minlength=4))
    want = (x.astype(np.float64)[:, None, :] * (assign[:, None] == np.arange(4))[:, :, None]).sum(0)
    assert np.abs(part.sums / SCALE - want).max() < 500 / SCALE  # one rounding per row at most
    halves = partial_stats(x[:250], c)[0] + partial_stats(x[250:], c)[0]
    assert np.array_equal(halves.sums, part.sums) and halves.objective == part.objective


def test_empty_cluster_takes_half_of_the_largest_deterministically() -> None:
    x = unit_rows(np.abs(planted(n=400, k=3, d=8)[0]))  # every row in the positive orthant
    far = -unit_rows(x.mean(0, keepdims=True))  # nobody is nearer to it than to a data point
    c = np.vstack([x[:3], far])
    total = partial_stats(x, c)[0]
    assert total.counts[3] == 0
    new, refilled = update_centroids(c, total, seed=5, iteration=0)
    again, _ = update_centroids(c, total, seed=5, iteration=0)
    other, _ = update_centroids(c, total, seed=6, iteration=0)
    assert refilled == 1 and np.array_equal(new, again) and not np.array_equal(new, other)
    donor = int(np.argmax(total.counts))
    assert np.allclose(np.linalg.norm(new, axis=1), 1, atol=1e-6)
    assert 0.99 < float(new[3] @ new[donor]) < 1.0  # the two halves start close together, apart
    assert partial_stats(x, new)[0].counts[3] > 0  # and the refilled cluster gets points


def test_sample_keys_depend_on_the_id_and_seed_only() -> None:
    ids = [f"{i:064x}" for i in range(2000)]
    k0 = sample_keys(ids, 0)
    assert np.array_equal(k0[::-1], sample_keys(ids[::-1], 0))
    assert not np.array_equal(k0, sample_keys(ids, 1))
    assert 0 <= k0.min() and k0.max() < 1 and abs(k0.mean() - 0.5) < 0.03


def test_smallest_keys_over_shards_is_the_global_choice() -> None:
    rng = np.random.default_rng(0)
    keys, rows = rng.random(100), rng.standard_normal((100, 4)).astype(np.float32)
    shards = [(keys[i:i + 30], rows[i:i + 30]) for i in range(0, 100, 30)]
    assert np.array_equal(smallest_keys(shards[::-1], 5), rows[np.argsort(keys)[:5]])
    with pytest.raises(ValueError, match="5 candidate rows for 6"):
        smallest_keys([(keys[:5], rows[:5])], 6)
