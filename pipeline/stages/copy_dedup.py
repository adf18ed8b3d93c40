"""`copy_dedup`: remove near-copies of evaluation images, then copy-detect the uncurated pool.

Decontamination first (cosine > ``eval_threshold`` to any eval image: reason
``eval_copy:<eval source>``, ``ref_id`` = that eval image), then a kNN graph over the survivors
(k neighbours, edges with cosine > ``threshold``), connected components, one kept per component
(the smallest image_id); the others are removed as ``copy`` of it. One decisions row per kept
uncurated image coming in.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.stages.vectorio import index_spec, load_vectors, planned_shards, split_shards
from pipeline.tables import DECISIONS_SCHEMA
from pipeline.vectors.copydetect import copy_components, decontaminate, pick_kept


@register
class CopyDedup(Stage):
    name = "copy_dedup"
    version = 1
    upstream = ("embed", "hash_dedup", "nsfw")
    section = "copy_dedup"
    kinds = ("uncurated",)
    schema = DECISIONS_SCHEMA
    output = "decisions"
    count_by = ("decision", "reason")
    description = "copy detection (kNN graph, cosine > 0.6, components) and eval-set decontamination (> 0.45)"

    def plan(self, ctx: StageContext) -> list[Shard]:
        return planned_shards(ctx)

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        yield from split_shards(self._decide(ctx), shards)

    def _decide(self, ctx: StageContext) -> pa.Table:
        cfg = ctx.section
        u = load_vectors(ctx, ("uncurated",))
        n = len(u)
        reason = np.full(n, None, object)
        ref = np.full(n, None, object)
        score = np.full(n, np.nan)
        evals = {name: load_vectors(ctx, (), [name]) for name in [s.name for s in ctx.config.sources.eval]}
        evals = {k: v for k, v in evals.items() if len(v)}
        if n and evals:
            dec = decontaminate(u.x, {k: v.x for k, v in evals.items()}, cfg.eval_threshold, index_spec(cfg.index))
            for i in np.flatnonzero(dec.removed):
                src = dec.sources[dec.source[i]]
                reason[i], ref[i], score[i] = f"eval_copy:{src}", evals[src].ids[dec.eval_row[i]], dec.best_sim[i]
        alive = np.flatnonzero(reason == None)  # noqa: E711 - object array comparison
        if len(alive) > 1:
            graph = copy_components(u.x[alive], cfg.k, cfg.threshold, index_spec(cfg.index))
            keep = pick_kept(graph.labels, np.arange(len(alive)))  # ids are sorted: smallest image_id kept
            for pos in np.flatnonzero(keep != np.arange(len(alive))):
                i, r = alive[pos], alive[keep[pos]]
                reason[i], ref[i], score[i] = "copy", u.ids[r], float(u.x[i] @ u.x[r])
        removed = reason != None  # noqa: E711
        return pa.table({
            "image_id": pa.array(u.ids.tolist(), pa.string()), "source": pa.array(u.sources.tolist(), pa.string()),
            "stage": pa.array([self.name] * n, pa.string()),
            "decision": pa.array(np.where(removed, "removed", "kept").tolist(), pa.string()),
            "reason": pa.array(reason.tolist(), pa.string()), "score": pa.array(score, pa.float64(), mask=~removed),
            "ref_id": pa.array(ref.tolist(), pa.string()),
        }, schema=DECISIONS_SCHEMA)
