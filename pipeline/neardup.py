"""Near-duplicate search on binary codes with FAISS, grouping, and a deterministic representative."""
from __future__ import annotations

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def binary_index(bits: int, n: int, kind: str = "auto", flat_max: int = 2_000_000, radius: int = 0):
    """A FAISS binary index: exhaustive flat (exact), or multi-index hashing for large n.

    Multi-index hashing splits the code into ``radius + 1`` substrings (at most one per byte), so
    by the pigeonhole principle every pair within ``radius`` shares one substring exactly: the
    search stays exact while only comparing codes that collide somewhere.
    """
    import faiss

    if kind == "flat" or (kind == "auto" and n <= flat_max):
        return faiss.IndexBinaryFlat(bits)
    nhash = min(radius + 1, bits // 8)
    if nhash < radius + 1:
        raise ValueError(f"multihash is exact only for radius < {bits // 8} with {bits}-bit codes; use index: flat")
    return faiss.IndexBinaryMultiHash(bits, nhash, bits // nhash)


def near_duplicate_pairs(codes: np.ndarray, radius: int, kind: str = "auto",
                         flat_max: int = 2_000_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i < j) of rows whose Hamming distance is <= radius, with their distances."""
    n, nbytes = codes.shape
    if n < 2:
        empty = np.empty(0, np.int64)
        return empty, empty, empty
    index = binary_index(nbytes * 8, n, kind, flat_max, radius)
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    index.add(codes)
    lims, dist, nbr = index.range_search(codes, radius + 1)  # FAISS returns distances < the given radius
    src = np.repeat(np.arange(n), np.diff(lims.astype(np.int64)))
    keep = src < nbr
    return src[keep], nbr[keep].astype(np.int64), dist[keep].astype(np.int64)


def group(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected components (union-find semantics) of n items joined by edges (i, j): a label each."""
    graph = coo_matrix((np.ones(len(i), np.int8), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def representatives(labels: np.ndarray, area: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """For every item, the index of its group's representative: largest area, then smallest rank
    (pass positions in image_id order as the rank to break ties by the smallest image_id)."""
    order = np.lexsort((rank, -area.astype(np.int64), labels))  # by label, then area desc, then rank asc
    first = np.ones(len(order), bool)
    first[1:] = labels[order][1:] != labels[order][:-1]
    heads = order[first]
    rep_of_label = np.empty(int(labels.max()) + 1 if len(labels) else 0, dtype=np.int64)
    rep_of_label[labels[heads]] = heads
    return rep_of_label[labels]
