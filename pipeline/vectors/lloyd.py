"""Spherical k-means as per-shard partial sums: the math of the sharded ``cluster`` stage.

One Lloyd iteration is a map over embedding shards (``partial_stats``: each row's nearest
centroid, per-centroid sums and counts) and a reduction (``Partial.__add__``) followed by an
update in the driver (``update_centroids``). Only O(k·d) state leaves a shard.

Sums are fixed point: every unit-vector component is rounded to an integer multiple of 2⁻²⁴
(``SCALE``) and summed as int64, so the reduction is exact and its order does not matter. The
result is the same for any number of workers, shard size or order in which shards finish
(up to 2³⁹ rows per centroid before an int64 could overflow).

Sampling is by a seeded hash of ``image_id`` (``sample_keys``), never by row position: the
initial centroids are the rows with the k smallest keys, and the training sample is the rows
whose key is below a threshold. Both depend only on the set of images and the seed.

Empty clusters are refilled deterministically: in index order, each takes half of the then
largest cluster (ties: lowest index), the two centroids pushed apart along a seeded direction.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pipeline.vectors.index import IndexSpec, build_index, knn_search

SCALE = 1 << 24  # fixed-point unit of the sums
SPLIT_EPS = 1.0 / 1024  # how far an empty cluster's new centroid and its donor are pushed apart


@dataclass
class Partial:
    """What one shard (or several, summed) contributes to an iteration."""

    sums: np.ndarray  # int64 [k, d]: fixed-point sum of the rows assigned to each centroid
    counts: np.ndarray  # int64 [k]
    objective: int  # fixed-point sum of every row's cosine to its centroid

    @classmethod
    def zeros(cls, k: int, d: int) -> "Partial":
        return cls(np.zeros((k, d), np.int64), np.zeros(k, np.int64), 0)

    def __add__(self, other: "Partial") -> "Partial":
        return Partial(self.sums + other.sums, self.counts + other.counts, self.objective + other.objective)

    @property
    def rows(self) -> int:
        return int(self.counts.sum())

    def mean_similarity(self) -> float:
        """Mean cosine of the rows to their centroids (the spherical k-means objective per row)."""
        return self.objective / SCALE / max(self.rows, 1)


def sample_keys(ids: list[str], seed: int) -> np.ndarray:
    """A uniform key in [0, 1) per image id, from a seeded hash: the same image, the same key."""
    salt = f"{seed}:".encode()
    out = np.empty(len(ids), np.float64)
    for i, image_id in enumerate(ids):
        h = hashlib.blake2b(salt + image_id.encode(), digest_size=8).digest()
        out[i] = (int.from_bytes(h, "big") >> 11) / float(1 << 53)
    return out


def nearest(x: np.ndarray, centroids: np.ndarray, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """The nearest centroid (largest cosine; ties: lowest index) of each unit row: (assign int64, sim float32).

    Rows are scored in fixed blocks of ``block`` so a row's result does not depend on how many
    rows share its shard."""
    n = len(x)
    assign, sim = np.empty(n, np.int64), np.empty(n, np.float32)
    index = build_index(centroids, IndexSpec(kind="flat"))
    for start in range(0, n, block):
        s, i = knn_search(index, x[start:start + block], 1)
        assign[start:start + block], sim[start:start + block] = i[:, 0], s[:, 0]
    return assign, sim


def fixed(x: np.ndarray) -> np.ndarray:
    """Fixed-point int64 of float values in [-1, 1] (see ``SCALE``)."""
    return np.rint(np.asarray(x, np.float64) * SCALE).astype(np.int64)


def partial_stats(x: np.ndarray, centroids: np.ndarray) -> tuple[Partial, np.ndarray, np.ndarray]:
    """Assign unit rows to their nearest centroid: (the shard's Partial, assign, sim)."""
    k, d = centroids.shape
    assign, sim = nearest(x, centroids)
    part = Partial.zeros(k, d)
    if len(x):
        np.add.at(part.sums, assign, fixed(x))
        part.counts += np.bincount(assign, minlength=k)
        part.objective = int(fixed(sim).sum())
    return part, assign, sim


def _direction(seed: int, iteration: int, cluster: int, d: int) -> np.ndarray:
    r = np.random.default_rng([seed, iteration, cluster]).standard_normal(d)
    return r / np.linalg.norm(r)


def update_centroids(centroids: np.ndarray, total: Partial, seed: int, iteration: int) -> tuple[np.ndarray, int]:
    """New unit centroids from the reduced sums; returns (centroids, number of empty clusters refilled).

    A cluster with no rows (or a zero sum) takes half of the largest cluster: both get the donor's
    mean, pushed ±``SPLIT_EPS`` along a direction seeded by (seed, iteration, empty cluster)."""
    sums = total.sums.astype(np.float64) / SCALE
    counts = total.counts.astype(np.int64).copy()
    norms = np.linalg.norm(sums, axis=1)
    new = np.where(norms[:, None] > 0, sums / np.maximum(norms, 1e-300)[:, None], centroids.astype(np.float64))
    empty = np.flatnonzero((counts == 0) | (norms == 0))
    for j in empty:
        donor = int(np.argmax(counts))  # lowest index among the largest
        r = _direction(seed, iteration, int(j), new.shape[1])
        base = new[donor]
        a, b = base + SPLIT_EPS * r, base - SPLIT_EPS * r
        new[j], new[donor] = a / np.linalg.norm(a), b / np.linalg.norm(b)
        counts[j] = counts[donor] // 2
        counts[donor] -= counts[j]
    return new.astype(np.float32), len(empty)


def smallest_keys(candidates: list[tuple[np.ndarray, np.ndarray]], k: int) -> np.ndarray:
    """The rows with the k smallest keys among per-shard candidates ``(keys, rows)``, ordered by key."""
    keys = np.concatenate([c[0] for c in candidates]) if candidates else np.zeros(0)
    rows = np.concatenate([c[1] for c in candidates]) if candidates else np.zeros((0, 0), np.float32)
    if len(keys) < k:
        raise ValueError(f"{len(keys)} candidate rows for {k} initial centroids")
    order = np.argsort(keys, kind="stable")[:k]
    return rows[order]
