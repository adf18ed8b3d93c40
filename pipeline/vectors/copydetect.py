"""Copy detection on embeddings (DINOv2 §3): a kNN graph, cosine edges, components; decontamination.

Self-dedup: every uncurated row's k nearest other rows; an edge for each neighbour with cosine
strictly above the threshold (paper: k = 64, > 0.6); connected components of the undirected
graph; one image kept per component. Decontamination: every uncurated row whose best cosine to
any evaluation image is strictly above a threshold (paper: > 0.45) is removed.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from pipeline.neardup import group, representatives
from pipeline.vectors.index import IndexSpec, as_rows, build_index, knn_search

QUERY_BATCH = 65536


@dataclass(frozen=True)
class CopyGraph:
    """Connected components of the copy graph: a label per row and the edges (i < j, unique)."""
    labels: np.ndarray  # [n] int: component of each row (singletons get their own label)
    edge_i: np.ndarray  # [e] int64, edge_i < edge_j
    edge_j: np.ndarray  # [e] int64
    edge_sim: np.ndarray  # [e] float32: cosine of the pair (the larger of the two directions' estimates)


def knn_edges(index, x: np.ndarray, k: int, threshold: float,
              batch: int = QUERY_BATCH) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Directed edges (row, neighbour, sim) from each row of x to its k nearest indexed rows other
    than itself with sim > threshold. Searches k + 1 so the row itself can be dropped, wherever
    it ranks (exact duplicates tie with it)."""
    parts_i, parts_j, parts_s = [], [], []
    for start in range(0, len(x), batch):
        sims, ids = knn_search(index, x[start:start + batch], k + 1, batch)
        rows = np.arange(start, start + len(ids), dtype=np.int64)[:, None]
        valid = (ids != rows) & (ids >= 0)
        keep = valid & (np.cumsum(valid, axis=1) <= k) & (sims > threshold)
        parts_i.append(np.broadcast_to(rows, ids.shape)[keep])
        parts_j.append(ids[keep])
        parts_s.append(sims[keep])
    return _cat(parts_i, np.int64), _cat(parts_j, np.int64), _cat(parts_s, np.float32)


def undirected(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each pair once as (min, max), keeping the larger similarity of its two directions."""
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    key = lo * np.int64(n) + hi
    order = np.lexsort((-sim, key))
    first = np.ones(len(order), bool)
    first[1:] = key[order][1:] != key[order][:-1]
    pick = order[first]
    return lo[pick], hi[pick], sim[pick]


def copy_components(x: np.ndarray, k: int = 64, threshold: float = 0.6,
                    spec: IndexSpec = IndexSpec()) -> CopyGraph:
    """The copy graph of x: kNN (self excluded), edges with cosine > threshold, components."""
    n = len(x)
    if n == 0:
        empty = np.empty(0, np.int64)
        return CopyGraph(np.empty(0, np.int32), empty, empty, np.empty(0, np.float32))
    index = build_index(x, spec)
    i, j, sim = undirected(n, *knn_edges(index, x, k, threshold))
    return CopyGraph(group(n, i, j), i, j, sim)


def pick_kept(labels: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For every row, the row kept for its component: the smallest ``rank`` (ties: smallest row).

    Pass positions in image_id order (ties then go to the smallest image_id) or any quality rank
    (0 = best). A row is kept iff ``pick_kept(...)[r] == r``; the others use it as ``ref_id``.
    """
    labels = np.asarray(labels)
    if len(labels) == 0:
        return np.empty(0, np.int64)
    # representatives sorts stably by (label, -area, rank): equal ranks fall back to row order
    return representatives(labels, np.zeros(len(labels), np.int64), np.asarray(rank))


# --------------------------------------------------------------------------- decontamination


@dataclass(frozen=True)
class Decontamination:
    """Best match of every uncurated row among all evaluation images, and what is removed.

    ``best_sim`` is -inf for rows with no evaluation image above the threshold when the reverse
    search direction was used (it only finds pairs above the threshold), and when there are no
    evaluation images at all. ``source`` indexes ``sources``; -1 with ``eval_row`` -1 means no match.
    """
    sources: tuple[str, ...]
    best_sim: np.ndarray  # [n] float32
    source: np.ndarray  # [n] int16/int32: index into `sources` of the best match, -1 if none
    eval_row: np.ndarray  # [n] int64: row of the best match within its eval set, -1 if none
    removed: np.ndarray  # [n] bool: best_sim > threshold
    threshold: float
    direction: str  # "index_eval" (eval indexed, uncurated streamed) or "index_uncurated"
    removed_by: dict[str, int] = field(default_factory=dict)  # removed rows whose best match is in that source
    matches: dict[str, int] = field(default_factory=dict)  # rows above threshold to that source (may overlap)

    def source_names(self) -> np.ndarray:
        """The best-matching source's name per row (None where there is no match)."""
        names = np.array(list(self.sources) + [None], dtype=object)
        return names[self.source]


def search_direction(n_uncurated: int, n_eval: int) -> str:
    """Index the smaller side. Eval sets are usually tiny next to the pool (50k ImageNet val
    images vs ~1B): indexing them costs little memory, and the pool is streamed through in
    batches, never held as an index. If the eval images outnumber the pool, the pool is
    indexed instead and each eval set range-searched against it (only pairs above the
    threshold come back, which is all removal needs)."""
    return "index_uncurated" if n_eval > n_uncurated else "index_eval"


def decontaminate(x: np.ndarray, eval_sets: dict[str, np.ndarray], threshold: float = 0.45,
                  spec: IndexSpec = IndexSpec(), direction: str = "auto",
                  batch: int = QUERY_BATCH) -> Decontamination:
    """For every uncurated row, its best cosine to any evaluation image (which source, which row);
    removed iff that is > threshold. Ties between sources go to the first in ``eval_sets`` order."""
    n = len(x)
    names = tuple(eval_sets)
    if direction == "auto":
        direction = search_direction(n, sum(len(v) for v in eval_sets.values()))
    if direction not in ("index_eval", "index_uncurated"):
        raise ValueError(f"direction must be auto, index_eval or index_uncurated, not {direction!r}")
    best = np.full(n, -np.inf, np.float32)
    src = np.full(n, -1, np.int32)
    row = np.full(n, -1, np.int64)
    matches = {}
    pool_index = build_index(x, replace(spec, gpu=False)) if direction == "index_uncurated" and n else None
    for s, name in enumerate(names):
        ev = eval_sets[name]
        if len(ev) == 0 or n == 0:
            matches[name] = 0
            continue
        if pool_index is None:
            sim, hit = _best_in_eval(x, ev, spec, batch)
        else:
            sim, hit = _best_via_pool(pool_index, n, ev, threshold, batch)
        matches[name] = int((sim > threshold).sum())
        better = sim > best
        best[better], src[better], row[better] = sim[better], s, hit[better]
    removed = best > threshold
    removed_by = {name: int(((src == s) & removed).sum()) for s, name in enumerate(names)}
    return Decontamination(names, best, src, row, removed, threshold, direction, removed_by, matches)


def _best_in_eval(x: np.ndarray, ev: np.ndarray, spec: IndexSpec, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Index one eval set, stream the pool through it: nearest eval row and sim per pool row."""
    sims, ids = knn_search(build_index(ev, spec), x, 1, batch)
    return sims[:, 0], ids[:, 0]


def _best_via_pool(pool_index, n: int, ev: np.ndarray, threshold: float,
                   batch: int) -> tuple[np.ndarray, np.ndarray]:
    """Range-search one eval set against the indexed pool; per pool row the best eval row above
    the threshold (sim -inf, row -1 where none is)."""
    best = np.full(n, -np.inf, np.float32)
    hit = np.full(n, -1, np.int64)
    for start in range(0, len(ev), batch):
        lims, sims, ids = pool_index.range_search(as_rows(ev[start:start + batch]), float(threshold))
        evrow = start + np.repeat(np.arange(len(lims) - 1, dtype=np.int64), np.diff(lims.astype(np.int64)))
        ids = ids.astype(np.int64)
        # best eval row per pool row; ties go to the smaller eval row (index_eval's flat search agrees)
        order = np.lexsort((evrow, -sims, ids))
        first = np.ones(len(order), bool)
        first[1:] = ids[order][1:] != ids[order][:-1]
        pick = order[first]
        better = sims[pick] > best[ids[pick]]
        best[ids[pick][better]] = sims[pick][better]
        hit[ids[pick][better]] = evrow[pick][better]
    return best, hit


def _cat(parts: list[np.ndarray], dtype) -> np.ndarray:
    return np.concatenate(parts).astype(dtype, copy=False) if parts else np.empty(0, dtype)
