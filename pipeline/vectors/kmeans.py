"""Spherical k-means with FAISS, hierarchical k-means with resampling, and balanced sampling.

Hierarchical k-means and hierarchical sampling follow Vo et al. 2024, "Automatic data curation
for self-supervised learning: a clustering-based approach" (arXiv 2405.15613, Algorithm 1 and
§4), on the unit sphere (our embeddings are L2-normalised; cosine is the similarity):

- Level 1 clusters the points; level ℓ+1 clusters the level-ℓ centroids. Every original point
  belongs to one cluster per level (its level-ℓ cluster's level-(ℓ+1) cluster, and so on).
- Resampling-clustering steps (per level, ``resampling_steps`` times): draw ``sample_size``
  points of the level's input from every cluster (the ones closest to its centroid, or at
  random), run k-means afresh on their union, and reassign all of the level's input points to
  the new centroids. Dense regions no longer attract most centroids, as each cluster contributes
  the same number of points. As in the authors' code, a level whose sample size is ≤ 1 skips
  resampling (one point per cluster would only return the same centroids), and the default
  sample size is half the level's average cluster size (their released config).
- Balanced sampling: top-down, each cluster splits its budget equally among its children; a
  child too small for its share gives what it cannot use back to its siblings (the largest
  ``c`` with Σ min(c, size) ≤ budget, the remainder one each to randomly chosen larger children);
  a level-1 cluster gives its budget as its points closest to its centroid (``closest``) or a
  random subset (``random``). Unlike the authors' code there is no replication multiplier:
  asking for at least every point returns every point.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.index import IndexSpec, as_rows, build_index, knn_search


@dataclass(frozen=True)
class Level:
    """One level of a hierarchical k-means."""
    centroids: np.ndarray  # [k, d] float32, unit norm
    assign: np.ndarray  # [n] int64: this level's cluster of every ORIGINAL point
    input_assign: np.ndarray  # [rows of this level's input] int64: points at level 1, level-(ℓ-1) clusters above
    input_sim: np.ndarray  # [rows of this level's input] float32: cosine of each input row to its centroid


def resolve_gpu(gpu) -> bool | int:
    """``"auto"`` → True when FAISS sees GPUs; booleans and GPU counts pass through."""
    if gpu == "auto":
        import faiss

        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    return gpu


def normalise(x: np.ndarray) -> np.ndarray:
    x = as_rows(x)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def assign_to(centroids: np.ndarray, x: np.ndarray, gpu="auto") -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (largest cosine) of every row: (assign [n] int64, sim [n] float32)."""
    index = build_index(centroids, IndexSpec(kind="flat", gpu=None if resolve_gpu(gpu) else False))
    sims, ids = knn_search(index, x, 1)
    return ids[:, 0], sims[:, 0]


def spherical_kmeans(x: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu="auto",
                     max_points_per_centroid: int = 256, nredo: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAISS spherical k-means: (centroids [k, d] unit norm, assign [n], cosine to centroid [n]).

    Trained on at most ``k · max_points_per_centroid`` rows (a seeded sample, drawn here so a
    float16 or memory-mapped x is only widened for that sample), then every row is assigned.
    FAISS initialises with k random training rows; ``nredo`` > 1 runs that many initialisations
    and keeps the one with the best objective (Lloyd's iterations can be stuck with two
    centroids in one mode and none in another). Same input and seed → same result.
    """
    import faiss

    n, d = np.shape(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= number of points, got k={k} for {n} points")
    cap = k * max_points_per_centroid
    train = as_rows(x if n <= cap else x[np.sort(np.random.default_rng(seed).choice(n, cap, replace=False))])
    km = faiss.Kmeans(d, k, niter=niter, seed=seed, spherical=True, gpu=resolve_gpu(gpu),
                      max_points_per_centroid=max_points_per_centroid,
                      min_points_per_centroid=1,  # only silences FAISS's "too few points" warning
                      nredo=nredo, verbose=False)
    km.train(train)
    centroids = normalise(km.centroids)
    assign, sim = assign_to(centroids, x, gpu)
    return centroids, assign, sim


def _per_level(value, n_levels: int, name: str) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n_levels
    if len(values) != n_levels:
        raise ValueError(f"{name} needs one value per level ({n_levels}), got {len(values)}")
    return values


def hierarchical_kmeans(x: np.ndarray, levels: list[int], niter: int = 20,
                        resampling_steps: int | list[int] = 0,
                        sample_size: int | list[int] | None = None, seed: int = 0,
                        strategy: str = "closest", gpu="auto",
                        max_points_per_centroid: int = 256, nredo: int = 1) -> list[Level]:
    """Hierarchical spherical k-means with resampling (Vo et al. 2024, Algorithm 1).

    ``levels``: clusters per level, bottom-up (e.g. ``[100_000, 10_000, 1_000]``), each at most
    the one below. ``resampling_steps`` and ``sample_size`` (points per cluster in a resampling
    step; None = half the level's average cluster size) are per level or one value for all.
    ``strategy``: how resampling draws points from a cluster, ``closest`` (paper) or ``random``.
    Each k-means run gets its own seed derived from ``seed``, the level and the step; ``nredo``
    initialisations per run (see ``spherical_kmeans``).
    """
    if not levels:
        raise ValueError("hierarchical_kmeans needs at least one level")
    if strategy not in ("closest", "random"):
        raise ValueError(f"strategy must be closest or random, not {strategy!r}")
    steps = _per_level(resampling_steps, len(levels), "resampling_steps")
    sizes = _per_level(sample_size, len(levels), "sample_size")
    out: list[Level] = []
    for level, k in enumerate(levels):
        inputs = x if level == 0 else out[-1].centroids
        size = sizes[level] if sizes[level] is not None else max(1, round(len(inputs) / k / 2))
        run_seed = seed + 1000 * level
        centroids, assign, sim = spherical_kmeans(inputs, k, niter, run_seed, gpu, max_points_per_centroid,
                                                   nredo)
        for step in range(steps[level] if size > 1 else 0):
            rng = np.random.default_rng([seed, level, step])
            rows = resample(assign, sim, k, size, strategy, rng)
            centroids, _, _ = spherical_kmeans(inputs[rows], k, niter, run_seed + step + 1, gpu,
                                               max_points_per_centroid, nredo)
            assign, sim = assign_to(centroids, inputs, gpu)
        original = assign if level == 0 else assign[out[-1].assign]
        out.append(Level(centroids, original, assign, sim))
    return out


def resample(assign: np.ndarray, sim: np.ndarray, k: int, size: int, strategy: str,
             rng: np.random.Generator) -> np.ndarray:
    """Up to ``size`` rows from every cluster (closest to the centroid, or random), at least k
    rows in all (topped up at random if clusters are too few to give them), in row order."""
    key = -sim.astype(np.float64) if strategy == "closest" else rng.random(len(assign))
    rows = take_per_group(assign, key, np.full(k, size, np.int64))
    if len(rows) < k:  # only when clusters went empty: k-means still needs k points
        rest = np.setdiff1d(np.arange(len(assign)), rows)
        rows = np.union1d(rows, rng.choice(rest, k - len(rows), replace=False))
    return rows


def take_per_group(group: np.ndarray, key: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The ``counts[g]`` rows of each group g with the smallest key (ties: smaller row), sorted."""
    order = np.lexsort((np.arange(len(group)), key, group))
    g = group[order]
    starts = np.searchsorted(g, np.arange(len(counts)))
    position = np.arange(len(order)) - starts[g]
    return np.sort(order[position < counts[g]])


def water_fill(parent: np.ndarray, sizes: np.ndarray, budget: np.ndarray,
               rng: np.random.Generator) -> np.ndarray:
    """Split each parent's budget among its children as equally as their sizes allow.

    Children c of parent p (``parent[c] == p``) get min(cut_p, size_c), with cut_p the largest
    value whose total fits the budget; what is left (fewer than the children larger than
    cut_p) goes one each to randomly chosen larger children. A budget at least the parent's
    total takes every child whole.
    """
    parent = np.asarray(parent, np.int64)
    sizes = np.asarray(sizes, np.int64)
    n_parents = len(budget)
    biggest = np.zeros(n_parents, np.int64)
    np.maximum.at(biggest, parent, sizes)
    whole = np.bincount(parent, sizes, n_parents) <= budget
    lo = np.where(whole, biggest, 0)  # invariant: Σ min(lo, size) ≤ budget < Σ min(hi, size)
    hi = biggest.copy()
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        fits = np.bincount(parent, np.minimum(mid[parent], sizes), n_parents) <= budget
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid)
    take = np.minimum(lo[parent], sizes)
    left = np.where(whole, 0, budget - np.bincount(parent, take, n_parents).astype(np.int64))
    larger = sizes > lo[parent]
    extra = take_per_group(parent, np.where(larger, rng.random(len(sizes)), 2.0), left)
    take[extra] += 1
    return take


def balanced_sample(levels: list[Level], n_samples: int, strategy: str = "closest",
                    seed: int = 0) -> np.ndarray:
    """Hierarchical balanced sampling (Vo et al. 2024): ``n_samples`` original rows, sorted.

    The budget is split equally among top-level clusters, then within each cluster equally among
    its children, down to level 1 (see ``water_fill``); a level-1 cluster gives its points
    closest to its centroid (``closest``) or a seeded random subset (``random``).
    """
    if strategy not in ("closest", "random"):
        raise ValueError(f"strategy must be closest or random, not {strategy!r}")
    n = len(levels[0].assign)
    if n_samples >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    top = levels[-1]
    budget = water_fill(np.zeros(len(top.centroids), np.int64),
                        np.bincount(top.assign, minlength=len(top.centroids)),
                        np.array([n_samples], np.int64), rng)
    for upper, lower in zip(levels[:0:-1], levels[-2::-1]):  # level ℓ's budget to its level-(ℓ-1) children
        sizes = np.bincount(lower.assign, minlength=len(lower.centroids))
        budget = water_fill(upper.input_assign, sizes, budget, rng)
    leaf = levels[0]
    key = -leaf.input_sim.astype(np.float64) if strategy == "closest" else rng.random(n)
    return take_per_group(leaf.assign, key, budget)
