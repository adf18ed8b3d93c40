"""`nsfw`: score every uncurated image with an NSFW classifier; remove those above the threshold."""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.engine import StageContext, register
from pipeline.stages.perimage import PerImageStage
from pipeline.tables import DECISIONS_SCHEMA


class NsfwBatch:
    """Ray Data actor: one classifier session per actor, decisions for a batch of images."""

    def __init__(self, model: str | None, threshold: float, threads: int | None = None):
        from pipeline.filters.nsfw import NsfwScorer

        self.scorer = NsfwScorer(model, threads=threads)
        self.threshold = threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        scores = self.scorer.score(batch["image"].to_pylist()).astype(np.float64)
        unscorable = np.isnan(scores)
        removed = unscorable | (scores > self.threshold)
        reason = np.where(unscorable, "unscorable", np.where(removed, "nsfw", None))
        n = batch.num_rows
        return pa.table({
            "image_id": batch["image_id"], "source": batch["source"],
            "stage": pa.array(["nsfw"] * n, pa.string()),
            "decision": pa.array(np.where(removed, "removed", "kept").tolist(), pa.string()),
            "reason": pa.array(reason.tolist(), pa.string()),
            "score": pa.array(scores, pa.float64(), mask=unscorable),
            "ref_id": pa.nulls(n, pa.string()),
            "_shard": batch["_shard"],
        })


@register
class Nsfw(PerImageStage):
    name = "nsfw"
    version = 1
    upstream = ("ingest",)
    section = "nsfw"
    schema = DECISIONS_SCHEMA
    output = "decisions"
    count_by = ("decision", "reason")
    batch_class = NsfwBatch
    description = "NSFW classifier (Yahoo Open-NSFW on onnxruntime by default); score per image, threshold"

    def batch_kwargs(self, ctx: StageContext) -> dict:
        cfg = ctx.section
        return {"model": str(cfg.model) if cfg.model else None, "threshold": cfg.threshold,
                "threads": max(1, int(cfg.num_cpus))}
