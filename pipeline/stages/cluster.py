"""`cluster`: spherical k-means (FAISS) of the deduplicated uncurated embeddings, optionally
hierarchical (Vo et al. 2024). Every image gets its cluster (and one per level); the centroids of
every level are stored with the output (``centroids.npz``: ``level0``, ``level1``, ...)."""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.stages.vectorio import load_vectors, planned_shards, split_shards
from pipeline.tables import CLUSTERS_SCHEMA
from pipeline.vectors.kmeans import hierarchical_kmeans, spherical_kmeans


def centroids_bytes(levels: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"level{i}": c for i, c in enumerate(levels)})
    return buf.getvalue()


def load_centroids(data: bytes) -> list[np.ndarray]:
    """The centroids of every level, finest first, from the stored artifact."""
    z = np.load(io.BytesIO(data))
    return [z[f"level{i}"] for i in range(len(z.files))]


@register
class Cluster(Stage):
    name = "cluster"
    version = 1
    upstream = ("copy_dedup", "embed")
    section = "cluster"
    kinds = ("uncurated",)
    schema = CLUSTERS_SCHEMA
    artifacts = ("centroids.npz",)
    description = "spherical k-means (FAISS) of the deduplicated uncurated embeddings; optional hierarchy"

    def plan(self, ctx: StageContext) -> list[Shard]:
        return planned_shards(ctx)

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        cfg = ctx.section
        v = load_vectors(ctx, ("uncurated",))
        n = len(v)
        if n == 0:
            ctx.write_artifact("centroids.npz", centroids_bytes([]))
            yield from split_shards(CLUSTERS_SCHEMA.empty_table(), shards)
            return
        k = min(cfg.n_clusters, n)
        if cfg.hierarchical:
            sizes = [k] + [min(c, k) for c in cfg.levels]
            levels = hierarchical_kmeans(v.x, sizes, niter=cfg.niter, resampling_steps=cfg.resampling_steps,
                                         seed=cfg.seed, nredo=cfg.nredo)
            centroids = [lv.centroids for lv in levels]
            assign = [lv.assign for lv in levels]
            sim = levels[0].input_sim
        else:
            c, a, sim = spherical_kmeans(v.x, k, niter=cfg.niter, seed=cfg.seed, nredo=cfg.nredo)
            centroids, assign = [c], [a]
        ctx.log.info("cluster: %d images into %d clusters (%s)", n, k,
                     " / ".join(str(len(c)) for c in centroids))
        ctx.write_artifact("centroids.npz", centroids_bytes(centroids))
        per_level = np.stack(assign, axis=1).astype(np.int32)
        table = pa.table({
            "image_id": pa.array(v.ids.tolist(), pa.string()), "source": pa.array(v.sources.tolist(), pa.string()),
            "cluster": pa.array(per_level[:, 0]), "similarity": pa.array(sim.astype(np.float32)),
            "clusters": pa.array(per_level.tolist(), pa.list_(pa.int32())),
        }, schema=CLUSTERS_SCHEMA)
        yield from split_shards(table, shards)
