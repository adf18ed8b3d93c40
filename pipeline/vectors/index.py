"""The one place that builds FAISS indexes over L2-normalised float32 rows (cosine = inner product).

Kinds:
- ``flat``: exact inner product (``IndexFlatIP``).
- ``ivf``: ``IndexIVFFlat`` — inverted lists over a k-means coarse quantizer, full vectors stored;
  ``nprobe`` lists searched per query.
- ``ivfpq``: ``IndexIVFPQ`` — the same with product-quantised residuals (``pq_m`` bytes a vector),
  the paper's choice at web scale (full vectors of 1B images do not fit in memory).
- ``auto``: ``flat`` up to ``flat_max`` rows; above it ``ivfpq`` when ``pq_m`` is set, else ``ivf``.

IVF indexes are trained on a seeded sample of ``train_sample`` rows (coarse k-means and PQ
codebooks both seeded by ``seed``), so the same input and spec give the same index.
With FAISS GPUs (``faiss.get_num_gpus() > 0``, unless ``gpu=False``) the trained, empty index is
cloned to all GPUs (sharded) before the vectors are added, so the add and every search run there.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

KINDS = ("auto", "flat", "ivf", "ivfpq")
# PQ sizes GPU IVFPQ supports (bytes per code); the default picks the largest dividing d.
_GPU_PQ_M = (96, 64, 56, 48, 40, 32, 28, 24, 20, 16, 12, 8, 4, 3, 2, 1)
_MIN_POINTS_PER_LIST = 39  # FAISS's own lower bound for k-means training points per centroid


@dataclass(frozen=True)
class IndexSpec:
    """How to index a set of vectors (see the module docstring for the kinds)."""
    kind: str = "auto"
    flat_max: int = 200_000
    nlist: int | None = None  # None: ≈ 4·sqrt(n), clipped to [1, 65536] and to train rows / 39
    pq_m: int | None = None  # None: the largest GPU-supported m dividing d with ≥ 2 dims per sub-vector
    nprobe: int = 16
    train_sample: int = 100_000
    seed: int = 0
    gpu: bool | None = None  # None: use FAISS GPUs when there are any; False: CPU only

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"index kind must be one of {KINDS}, not {self.kind!r}")


def as_rows(x: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 view/copy of a 2-D array (float16 embeddings are widened)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array of vectors, got shape {x.shape}")
    return np.ascontiguousarray(x, dtype=np.float32)


def resolve_kind(n: int, spec: IndexSpec) -> str:
    """The concrete kind ``spec`` gives for ``n`` rows."""
    if spec.kind != "auto":
        return spec.kind
    if n <= spec.flat_max:
        return "flat"
    return "ivfpq" if spec.pq_m else "ivf"


def default_nlist(n: int, n_train: int) -> int:
    """≈ 4·sqrt(n) inverted lists, at most 65,536 and at most one per 39 training rows."""
    nlist = int(round(4 * math.sqrt(max(n, 1))))
    return max(1, min(nlist, 65_536, n_train // _MIN_POINTS_PER_LIST))


def default_pq_m(d: int) -> int:
    for m in _GPU_PQ_M:
        if d % m == 0 and d // m >= 2:
            return m
    return 1


def use_gpu(spec: IndexSpec) -> bool:
    import faiss

    if spec.gpu is False:
        return False
    return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0


def train_rows(x: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded sample of ``size`` rows of x (all of them when x is not larger), in row order."""
    n = len(x)
    if n <= size:
        return x
    pick = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
    return as_rows(x[pick])


def empty_index(d: int, kind: str, nlist: int, pq_m: int, seed: int):
    """An untrained inner-product index of the given concrete kind."""
    import faiss

    if kind == "flat":
        return faiss.IndexFlatIP(d)
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        if d % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the dimension {d}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = seed
    index.cp.seed = seed  # the FAISS wrapper keeps `quantizer` alive with the index
    return index


def build_index(x: np.ndarray, spec: IndexSpec = IndexSpec()):
    """Index the rows of x (L2-normalised) for inner-product search, as ``spec`` says."""
    import faiss

    n, d = np.shape(x)
    kind = resolve_kind(n, spec)
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        sample = train_rows(x, spec.train_sample, spec.seed)
        nlist = min(spec.nlist or default_nlist(n, len(sample)), len(sample))
        index = empty_index(d, kind, nlist, spec.pq_m or default_pq_m(d), spec.seed)
        index.train(as_rows(sample))
        index.nprobe = min(spec.nprobe, nlist)
    if use_gpu(spec):
        index = to_gpus(index, kind)
    add_rows(index, x)
    return index


def to_gpus(index, kind: str):
    """Clone a (trained, empty) CPU index to all GPUs, sharded; nprobe is carried over."""
    import faiss

    options = faiss.GpuMultipleClonerOptions()
    options.shard = True
    options.useFloat16 = kind == "ivfpq"  # float16 lookup tables: large pq_m needs them on GPU
    return faiss.index_cpu_to_all_gpus(index, options)


def add_rows(index, x: np.ndarray, batch: int = 1 << 20) -> None:
    """Add rows in batches so float16 or memory-mapped inputs are widened one slice at a time."""
    for start in range(0, len(x), batch):
        index.add(as_rows(x[start:start + batch]))


def knn_search(index, queries: np.ndarray, k: int, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar indexed rows per query: (sims [m, k] float32, ids [m, k] int64).

    Missing neighbours (fewer than k indexed rows, or IVF lists too sparse) have id -1 and
    similarity -inf, so every ``sims > threshold`` test ignores them.
    """
    m = len(queries)
    sims = np.empty((m, k), np.float32)
    ids = np.empty((m, k), np.int64)
    for start in range(0, m, batch):
        stop = min(start + batch, m)
        sims[start:stop], ids[start:stop] = index.search(as_rows(queries[start:stop]), k)
    sims[ids < 0] = -np.inf
    return sims, ids
