"""Retrieval of uncurated images close to a curated source (DINOv2 §3, "Self-supervised image retrieval").

- sample-based: the k nearest uncurated images of every query image (paper: k = 4, 32 for
  ImageNet-1k), used for sources with more than 1M images;
- cluster-based: the uncurated pool is clustered (k-means); from every cluster holding more
  than ``min_hits`` of the source's images, up to ``per_cluster`` uncurated images (paper:
  > 3 hits, 10,000 images), at most ``cap`` per source (paper: 1M).

Both return one row per (query, uncurated image) hit. An uncurated image retrieved several times
keeps every row (its whole provenance); the dataset stage takes it once.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.vectors.index import IndexSpec, as_rows, build_index, knn_search

METHODS = ("auto", "sample", "cluster")


@dataclass(frozen=True)
class Retrieved:
    """Retrieval hits, one per row; ``method`` is ``sample`` or ``cluster``.

    sample:  query_row = the query, rank = its 0-based neighbour rank, similarity = cosine to it,
             cluster = -1.
    cluster: cluster = the cluster the image was taken from, rank = its position in that
             cluster's list (closest to the centroid first), similarity = cosine to the centroid;
             query_row = the source's query nearest to the image among the queries in that
             cluster and query_similarity its cosine, when vectors were passed — otherwise -1
             and NaN (the cluster is the provenance).
    """
    query_row: np.ndarray  # [m] int64
    uncurated_row: np.ndarray  # [m] int64
    rank: np.ndarray  # [m] int64
    similarity: np.ndarray  # [m] float32
    cluster: np.ndarray  # [m] int64
    query_similarity: np.ndarray  # [m] float32
    method: str

    def __len__(self) -> int:
        return len(self.uncurated_row)


def choose_method(method: str, n_queries: int, threshold: int = 1_000_000) -> str:
    """``auto`` → ``sample`` for sources with more than ``threshold`` images (the paper), else ``cluster``."""
    if method not in METHODS:
        raise ValueError(f"retrieval method must be one of {METHODS}, not {method!r}")
    if method != "auto":
        return method
    return "sample" if n_queries > threshold else "cluster"


def sample_retrieval(uncurated: np.ndarray, queries: np.ndarray, k: int, spec: IndexSpec = IndexSpec(),
                     index=None, batch: int = 65536) -> Retrieved:
    """The k nearest uncurated rows of every query row (ordered by query, then rank).

    Pass ``index`` (``build_index(uncurated, spec)``) to reuse one index for several sources.
    """
    if index is None:
        index = build_index(uncurated, spec)
    sims, ids = knn_search(index, queries, k, batch)
    hit = ids >= 0
    query_row, rank = np.nonzero(hit)
    return Retrieved(query_row.astype(np.int64), ids[hit], rank.astype(np.int64), sims[hit],
                     np.full(len(rank), -1, np.int64), sims[hit], "sample")


def cluster_retrieval(query_assign: np.ndarray, uncurated_assign: np.ndarray,
                      uncurated_sim_to_centroid: np.ndarray, min_hits: int = 3,
                      per_cluster: int = 10_000, cap: int = 1_000_000, seed: int = 0,
                      uncurated: np.ndarray | None = None, queries: np.ndarray | None = None) -> Retrieved:
    """Cluster-based retrieval for one source.

    Clusters holding more than ``min_hits`` of the source's queries, by descending hit count
    then cluster id; from each, up to ``per_cluster`` uncurated rows by descending cosine to the
    centroid (ties: smaller row); rows are taken in that order until ``cap`` (so the last
    cluster may be cut short). Fully deterministic: ``seed`` is accepted for configuration
    symmetry but nothing is random. With ``uncurated`` and ``queries`` (the vectors, rows
    matching the assignments; memory maps are fine, only hit rows are read), each hit also
    gets its nearest query within the cluster.
    """
    del seed  # no randomness: the order is total
    query_assign = np.asarray(query_assign, np.int64)
    assign = np.asarray(uncurated_assign, np.int64)
    sim = np.asarray(uncurated_sim_to_centroid, np.float32)
    n_clusters = int(max(query_assign.max(initial=-1), assign.max(initial=-1))) + 1
    hits = np.bincount(query_assign, minlength=n_clusters)
    chosen = np.flatnonzero(hits > min_hits)
    chosen = chosen[np.lexsort((chosen, -hits[chosen]))]
    priority = np.full(n_clusters, -1, np.int64)
    priority[chosen] = np.arange(len(chosen))

    order = np.lexsort((np.arange(len(assign)), -sim, assign))  # by cluster, then closest first
    starts = np.searchsorted(assign[order], np.arange(n_clusters))
    position = np.arange(len(order)) - starts[assign[order]]
    take = (priority[assign[order]] >= 0) & (position < per_cluster)
    rows, position = order[take], position[take]
    final = np.lexsort((position, priority[assign[rows]]))[:cap]
    rows, position = rows[final], position[final]

    query_row = np.full(len(rows), -1, np.int64)
    query_sim = np.full(len(rows), np.nan, np.float32)
    if uncurated is not None and queries is not None:
        nearest_queries(rows, assign[rows], query_assign, uncurated, queries, query_row, query_sim)
    return Retrieved(query_row, rows.astype(np.int64), position.astype(np.int64), sim[rows],
                     assign[rows], query_sim, "cluster")


def nearest_queries(rows: np.ndarray, clusters: np.ndarray, query_assign: np.ndarray,
                    uncurated: np.ndarray, queries: np.ndarray,
                    query_row: np.ndarray, query_sim: np.ndarray) -> None:
    """Fill, for each hit row, its most similar query among the queries of its cluster."""
    q_order = np.argsort(query_assign, kind="stable")
    q_sorted = query_assign[q_order]
    by_cluster = np.argsort(clusters, kind="stable")
    bounds = np.flatnonzero(np.diff(clusters[by_cluster])) + 1
    for part in np.split(by_cluster, bounds):
        if len(part) == 0:
            continue
        c = clusters[part[0]]
        candidates = q_order[np.searchsorted(q_sorted, c):np.searchsorted(q_sorted, c, side="right")]
        part = part[np.argsort(rows[part], kind="stable")]  # read the vectors in row order
        sims = as_rows(uncurated[rows[part]]) @ as_rows(queries[candidates]).T
        best = np.argmax(sims, axis=1)  # ties: the first candidate, i.e. the smaller query row
        query_row[part] = candidates[best]
        query_sim[part] = sims[np.arange(len(best)), best]
