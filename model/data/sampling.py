"""Deterministic per-rank sample plan over a list of Parquet files (pure Python / numpy, no Ray).

Rows are addressed by ``(file index, row index)``. The data are cut into *units* and every rank
owns some of them (its shard):

- a unit is the rows ``r`` of one file with ``r % K == k``; ``K`` is the smallest number of row
  subsets per file that gives at least ``world_size`` non-empty units. With at least
  ``world_size`` non-empty files ``K == 1``: units are whole files.
- units are assigned to ranks greedily, largest first, to the least-loaded rank (ties: lowest
  rank), so every rank gets at least one unit and the per-pass sizes are as even as whole units
  allow.

A rank's stream is endless: pass ``p`` visits the rank's files in a permutation seeded by
``(seed, rank, p)``, and inside each file the rank's rows of that file in a permutation seeded by
``(seed, rank, p, file)``; passes are concatenated. A reader therefore reads each of its files once
per pass, sequentially by file. Position ``i`` of the stream (and so the batch of any step) is
computed directly, without iterating from 0: only the permutations of the pass and files it falls
in are built (and the last few are cached).

Permutations come from ``numpy.random.default_rng`` (PCG64 seeded via ``SeedSequence``); a plan is
reproducible as long as numpy's ``Generator.permutation`` stream is (stable across numpy 1.17–2.x
releases so far, but not formally guaranteed by NEP 19).
"""
from __future__ import annotations

import bisect
import functools
import heapq
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["Unit", "SamplePlan", "split_units", "assign_units", "subsets_per_file"]

_FILE_ORDER, _ROW_ORDER = 0, 1  # domain tags of the two seeded streams


@dataclass(frozen=True, order=True)
class Unit:
    """Rows ``r`` of file ``file`` with ``r % num_subsets == subset``."""

    file: int
    subset: int
    num_subsets: int

    def size(self, num_rows: int) -> int:
        """How many rows of a file with ``num_rows`` rows belong to this unit."""
        return max(0, (num_rows - self.subset + self.num_subsets - 1) // self.num_subsets)

    def rows(self, num_rows: int) -> np.ndarray:
        """The unit's row indices, ascending."""
        return np.arange(self.subset, num_rows, self.num_subsets, dtype=np.int64)


def _check_counts(row_counts: Sequence[int], world_size: int) -> list[int]:
    counts = [int(n) for n in row_counts]
    if any(n < 0 for n in counts):
        raise ValueError(f"row counts must be >= 0, got {counts}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(counts)
    if total == 0:
        raise ValueError(f"the dataset has no rows ({len(counts)} files)")
    if total < world_size:
        raise ValueError(f"the dataset has {total} rows in {len(counts)} files, fewer than world_size={world_size}: "
                         "every rank needs at least one row")
    return counts


def subsets_per_file(row_counts: Sequence[int], world_size: int) -> int:
    """The smallest ``K`` with ``sum(min(K, rows of f)) >= world_size`` (1 when there are enough non-empty files)."""
    counts = _check_counts(row_counts, world_size)
    lo, hi = 1, max(counts)  # K = max(counts) gives sum = total rows >= world_size
    while lo < hi:
        mid = (lo + hi) // 2
        if sum(min(mid, n) for n in counts) >= world_size:
            hi = mid
        else:
            lo = mid + 1
    return lo


def split_units(row_counts: Sequence[int], world_size: int) -> list[Unit]:
    """The non-empty units of the dataset, file-major (see the module docstring)."""
    counts = _check_counts(row_counts, world_size)
    k = subsets_per_file(counts, world_size)
    return [Unit(f, s, k) for f, n in enumerate(counts) for s in range(min(k, n))]


def assign_units(row_counts: Sequence[int], world_size: int) -> list[list[Unit]]:
    """Units per rank (largest unit first to the least-loaded rank); every rank gets at least one."""
    counts = _check_counts(row_counts, world_size)
    units = sorted(split_units(counts, world_size), key=lambda u: (-u.size(counts[u.file]), u))
    heap = [(0, r) for r in range(world_size)]
    owned: list[list[Unit]] = [[] for _ in range(world_size)]
    for u in units:
        load, r = heapq.heappop(heap)
        owned[r].append(u)
        heapq.heappush(heap, (load + u.size(counts[u.file]), r))
    return [sorted(us) for us in owned]


class SamplePlan:
    """Rank ``rank``'s endless, seeded stream of ``(file_idx, row_idx)`` and its batches.

    ``batch(step)`` is rows ``step * batch_size ... step * batch_size + batch_size - 1`` of the
    stream; a batch may span two passes (and, when a rank has fewer rows than ``batch_size``,
    hold a row more than once).
    """

    def __init__(self, row_counts: Sequence[int], *, world_size: int, rank: int, batch_size: int, seed: int,
                 cache_size: int = 4) -> None:
        counts = _check_counts(row_counts, world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.row_counts = tuple(counts)
        self.world_size, self.rank, self.batch_size, self.seed = world_size, rank, batch_size, int(seed)
        self.units: tuple[Unit, ...] = tuple(assign_units(counts, world_size)[rank])
        files = sorted({u.file for u in self.units})
        self.files: tuple[int, ...] = tuple(files)
        # the rank's rows of each of its files, ascending (one "piece" per file)
        self._piece_units = {f: [u for u in self.units if u.file == f] for f in files}
        self._piece_sizes = {f: sum(u.size(counts[f]) for u in us) for f, us in self._piece_units.items()}
        self.images_per_pass = sum(self._piece_sizes.values())
        self._layout = functools.lru_cache(maxsize=cache_size)(self._compute_layout)
        self._piece_order = functools.lru_cache(maxsize=cache_size)(self._compute_piece_order)

    def __repr__(self) -> str:
        return (f"SamplePlan(rank={self.rank}/{self.world_size}, files={len(self.files)}, "
                f"images_per_pass={self.images_per_pass}, batch_size={self.batch_size}, seed={self.seed})")

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, *key])

    def _compute_layout(self, p: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Pass ``p``: the file order and the cumulative row counts at the end of each file."""
        order = tuple(self.files[i] for i in self._rng(p, _FILE_ORDER).permutation(len(self.files)))
        ends, acc = [], 0
        for f in order:
            acc += self._piece_sizes[f]
            ends.append(acc)
        return order, tuple(ends)

    def _compute_piece_order(self, p: int, f: int) -> np.ndarray:
        """Pass ``p``: the rank's rows of file ``f`` in visiting order."""
        units = self._piece_units[f]
        rows = units[0].rows(self.row_counts[f]) if len(units) == 1 else \
            np.sort(np.concatenate([u.rows(self.row_counts[f]) for u in units]))
        return rows[self._rng(p, _ROW_ORDER, f).permutation(len(rows))]

    def position(self, i: int) -> tuple[int, int]:
        """``(file_idx, row_idx)`` at position ``i >= 0`` of the rank's endless stream."""
        if i < 0:
            raise ValueError(f"stream positions are >= 0, got {i}")
        p, j = divmod(i, self.images_per_pass)
        order, ends = self._layout(p)
        k = bisect.bisect_right(ends, j)
        start = ends[k - 1] if k else 0
        f = order[k]
        return f, int(self._piece_order(p, f)[j - start])

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(file_idx, row_idx)`` of the rank's batch at ``step >= 0``."""
        if step < 0:
            raise ValueError(f"steps are >= 0, got {step}")
        first = step * self.batch_size
        return [self.position(i) for i in range(first, first + self.batch_size)]

    def pass_order(self, p: int) -> list[tuple[int, int]]:
        """Every ``(file_idx, row_idx)`` of pass ``p`` in stream order (for inspection and tests)."""
        order, _ = self._layout(p)
        return [(f, int(r)) for f in order for r in self._piece_order(p, f)]

    def epoch(self, step: int) -> float:
        """How many passes over the rank's data were completed before ``step`` (fractional)."""
        return step * self.batch_size / self.images_per_pass

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_cache_size"] = self._layout.cache_info().maxsize
        del state["_layout"], state["_piece_order"]
        return state

    def __setstate__(self, state: dict) -> None:
        size = state.pop("_cache_size")
        self.__dict__.update(state)
        self._layout = functools.lru_cache(maxsize=size)(self._compute_layout)
        self._piece_order = functools.lru_cache(maxsize=size)(self._compute_piece_order)
