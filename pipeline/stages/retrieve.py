"""`retrieve`: uncurated images near each curated source, sample-based or cluster-based.

Per curated source (settings: ``retrieve`` plus ``retrieve.sources.<name>`` overrides):
``sample`` takes the k nearest kept uncurated images of every query image; ``cluster`` takes up to
``per_cluster`` images (closest to the centroid first) from each cluster holding more than
``min_hits`` of the source's images, at most ``cap`` per source; ``auto`` picks sample-based for
sources with more than ``auto_threshold`` images, as the paper did. One row per hit: an image
retrieved by several queries keeps every row (the dataset takes it once).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.stages.cluster import load_centroids
from pipeline.stages.vectorio import index_spec, load_vectors, planned_shards, split_shards
from pipeline.tables import RETRIEVAL_SCHEMA
from pipeline.vectors.index import build_index
from pipeline.vectors.kmeans import assign_to
from pipeline.vectors.retrieval import Retrieved, choose_method, cluster_retrieval, sample_retrieval


@register
class Retrieve(Stage):
    name = "retrieve"
    version = 1
    upstream = ("cluster", "embed")
    section = "retrieve"
    kinds = ("uncurated",)
    schema = RETRIEVAL_SCHEMA
    count_by = ("query_source", "method")
    description = "sample-based and cluster-based retrieval of uncurated images near each curated source"

    def plan(self, ctx: StageContext) -> list[Shard]:
        return planned_shards(ctx)

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        cfg = ctx.section
        u = load_vectors(ctx, ("uncurated",))
        tables = []
        if len(u):
            clusters = pa.concat_tables(ctx.engine.read("cluster", columns=["image_id", "cluster", "similarity"]))
            order = pc.index_in(pa.array(u.ids.tolist(), pa.string()), clusters["image_id"]).to_numpy()
            u_assign = clusters["cluster"].to_numpy()[order]
            u_sim = clusters["similarity"].to_numpy()[order]
            centroids = load_centroids(ctx.engine.read_artifact("cluster", "centroids.npz"))[0]
            index = build_index(u.x, index_spec(cfg.index))
            for src in ctx.config.sources.curated:
                q = load_vectors(ctx, (), [src.name])
                if len(q) == 0:
                    continue
                s = cfg.for_source(src.name)
                method = choose_method(s.method, len(q), cfg.auto_threshold)
                if method == "sample":
                    hits = sample_retrieval(u.x, q.x, min(s.k, len(u)), index_spec(cfg.index), index=index)
                else:
                    q_assign, _ = assign_to(centroids, q.x)
                    hits = cluster_retrieval(q_assign, u_assign, u_sim, s.min_hits, s.per_cluster, s.cap,
                                             uncurated=u.x, queries=q.x)
                ctx.log.info("retrieve[%s]: %s-based, %d queries → %d hits", src.name, method, len(q), len(hits))
                tables.append(self._rows(src.name, u, q, hits))
        table = pa.concat_tables(tables).sort_by([("image_id", "ascending"), ("query_source", "ascending"),
                                                  ("rank", "ascending")]) if tables else RETRIEVAL_SCHEMA.empty_table()
        yield from split_shards(table, shards)

    def _rows(self, source: str, u, q, hits: Retrieved) -> pa.Table:
        qrow = hits.query_row
        query_id = [q.ids[r] if r >= 0 else None for r in qrow]
        sim = hits.similarity if hits.method == "sample" else np.where(np.isnan(hits.query_similarity),
                                                                        hits.similarity, hits.query_similarity)
        return pa.table({
            "image_id": pa.array(u.ids[hits.uncurated_row].tolist(), pa.string()),
            "source": pa.array(u.sources[hits.uncurated_row].tolist(), pa.string()),
            "query_source": pa.array([source] * len(hits), pa.string()),
            "query_id": pa.array(query_id, pa.string()),
            "rank": pa.array(hits.rank.astype(np.int32)),
            "similarity": pa.array(np.asarray(sim, np.float32)),
            "method": pa.array([hits.method] * len(hits), pa.string()),
            "cluster": pa.array(np.where(hits.cluster >= 0, hits.cluster, 0).astype(np.int32),
                                mask=hits.cluster < 0),
        }, schema=RETRIEVAL_SCHEMA)
