"""Loading kept embeddings into matrices, and hash-sharding combined outputs (shared by vector stages)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import IndexConfig
from pipeline.engine import Shard, StageContext
from pipeline.vectors.index import IndexSpec


@dataclass
class Vectors:
    """Rows of kept embeddings: ids, sources and a float32 matrix, sorted by image_id."""

    ids: np.ndarray      # object [n]
    sources: np.ndarray  # object [n]
    x: np.ndarray        # float32 [n, d]

    def __len__(self) -> int:
        return len(self.ids)


def load_vectors(ctx: StageContext, kinds: tuple[str, ...], sources: list[str] | None = None) -> Vectors:
    """Kept embeddings of every source of the given kinds (or the named sources), filtered by every
    decisions stage upstream of the current stage."""
    names = sources if sources is not None else [s.name for k, s in ctx.config.sources.all() if k in kinds]
    tables = [t for name in names for t in ctx.engine.kept(ctx.stage.name, name, ["image_id", "source", "embedding"],
                                                         table="embed")]
    if not tables:
        return Vectors(np.array([], object), np.array([], object), np.zeros((0, 0), np.float32))
    t = pa.concat_tables(tables)
    t = t.filter(pc.is_valid(t["embedding"])).sort_by("image_id")
    emb = t["embedding"].combine_chunks()
    d = emb.type.list_size
    x = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, d)
    x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)  # float16 storage: renormalise
    return Vectors(np.array(t["image_id"].to_pylist(), object), np.array(t["source"].to_pylist(), object), x)


def index_spec(cfg: IndexConfig, seed: int = 0) -> IndexSpec:
    return IndexSpec(kind=cfg.kind, flat_max=cfg.flat_max, nlist=cfg.nlist, pq_m=cfg.pq_m, nprobe=cfg.nprobe, seed=seed)


def embedded_rows(ctx: StageContext, kinds: tuple[str, ...]) -> int:
    """Rows the ``embed`` manifests list for the sources of ``kinds`` — manifests only, no data read: an upper
    bound on the vectors a combining stage reads once upstream filters have removed theirs."""
    return sum(ref.entry["rows"] for kind, src in ctx.config.sources.all() if kind in kinds
               for ref in ctx.engine.shard_refs("embed", partition=src.name))


def planned_shards(ctx: StageContext, kinds: tuple[str, ...] = ("uncurated",)) -> list[Shard]:
    """A combining stage's output shards, planned from the upstream manifests (see ``hash_shards``)."""
    return hash_shards(ctx, embedded_rows(ctx, kinds))


def hash_shards(ctx: StageContext, expected_rows: int) -> list[Shard]:
    """Output shards of a combining stage: ``ceil(rows / shard_rows)`` buckets by image_id hash."""
    n = max(1, -(-expected_rows // ctx.config.engine.shard_rows))
    return [Shard(i, n) for i in range(n)]


def bucket_of(ids: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """Bucket of each (hex) image_id: its first 8 hex digits modulo n."""
    return np.array([int(i[:8], 16) % n for i in ids.to_pylist()], dtype=np.int64)


def split_shards(table: pa.Table, shards: list[Shard]) -> list[tuple[int, pa.Table]]:
    """Cut a whole (sorted) output table into the requested hash shards."""
    if not shards:
        return []
    n = shards[0].payload
    buckets = bucket_of(table["image_id"], n)
    return [(s.index, table.filter(pa.array(buckets == s.index))) for s in shards]
