"""`embed`: every kept uncurated image and every curated and eval image as an L2-normalised vector.

Per-source on Ray Data (an actor pool: one model load per actor). Uncurated sources read
`face_blur`'s blurred bytes, curated and eval sources `ingest`'s. Weights are resolved in the
driver before any work (``check_weights``): when they cannot be had, the stage fails with a
message saying how to provide them; random weights only when the spec says ``none``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from pipeline.config import SOURCE_KINDS
from pipeline.engine import Shard, StageContext, StageError, register
from pipeline.engine.kept import images_stage
from pipeline.raydata import RAY_ONLY
from pipeline.stages.perimage import PerImageStage
from pipeline.tables import embeddings_schema


class EmbedBatch:
    """Ray Data actor: one Embedder per actor; vectors for a batch of encoded images."""

    def __init__(self, spec: str, device: str, precision: str, kind: str, dim: int):
        from pipeline.embedding import Embedder

        self.embedder = Embedder(spec, device=device, precision=precision)
        self.kind, self.type = kind, pa.list_(pa.float16(), dim)

    def __call__(self, batch: pa.Table) -> pa.Table:
        vecs = self.embedder.embed(batch["image"].to_pylist())
        bad = np.isnan(vecs.astype(np.float32)).any(axis=1)
        flat = pa.array(vecs.reshape(-1), pa.float16())
        emb = pa.FixedSizeListArray.from_arrays(flat, vecs.shape[1], mask=pa.array(bad))
        n = batch.num_rows
        return pa.table({"image_id": batch["image_id"], "source": batch["source"],
                         "kind": pa.array([self.kind] * n, pa.string()), "embedding": emb.cast(self.type),
                         "model": pa.array([self.embedder.model_id] * n, pa.string()), "_shard": batch["_shard"]})


def _absolute_spec(spec: str, base: Path | None) -> str:
    """Checkpoint paths in a spec made absolute (Ray actors do not share the driver's working directory)."""
    from pipeline.embedding import parse_spec

    parsed = parse_spec(spec)
    ckpt = parsed.checkpoint
    if ckpt and not os.path.isabs(ckpt):
        return str(parsed).replace(ckpt, str(((base or Path.cwd()) / ckpt).resolve()))
    return str(parsed)


@register
class Embed(PerImageStage):
    name = "embed"
    version = 1
    upstream = ("ingest", "face_blur")
    section = "embed"
    kinds = SOURCE_KINDS
    schema = embeddings_schema()
    output = "embeddings"
    count_by = ("kind",)
    batch_class = EmbedBatch
    fingerprint_exclude = RAY_ONLY | {"device", "precision"}
    description = "image embeddings (open_clip ViT-H-14 by default; dinov2 or timm backbones) on Ray Data"

    def _spec(self, ctx: StageContext) -> str:
        base = ctx.config.path.parent if ctx.config.path else None
        return _absolute_spec(ctx.section.model, base)

    def output_schema(self, ctx: StageContext) -> pa.Schema:
        from pipeline.embedding.embedder import embedding_dim

        return embeddings_schema(embedding_dim(self._spec(ctx)))

    def config_for_fingerprint(self, ctx: StageContext) -> dict:
        from pipeline.embedding import WeightsUnavailable, resolve_weights

        cfg = super().config_for_fingerprint(ctx)
        spec = self._spec(ctx)
        try:
            path = resolve_weights(spec).path
        except (WeightsUnavailable, ValueError):
            path = None  # compute() will fail with the reason; nothing is cached under this fingerprint
        ident = None if path is None else [Path(path).name, os.stat(path).st_size, os.stat(path).st_mtime_ns]
        return {**cfg, "model": spec, "weights": ident}

    def plan(self, ctx: StageContext) -> list[Shard]:
        assert ctx.partition is not None
        stage = images_stage(ctx.engine, self.name, ctx.partition.kind)
        refs = ctx.engine.shard_refs(stage, partition=ctx.partition.name)
        return [Shard(i, ref) for i, ref in enumerate(refs)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        from pipeline.embedding import WeightsUnavailable, check_weights

        try:
            where = check_weights(self._spec(ctx))
        except (WeightsUnavailable, ValueError) as err:
            raise StageError(f"embed: {err}") from None
        ctx.log.info("embed[%s]: %s, weights: %s", ctx.partition.name, self._spec(ctx), where)
        yield from super().compute(ctx, shards)

    def batch_kwargs(self, ctx: StageContext) -> dict:
        cfg = ctx.section
        return {"spec": self._spec(ctx), "device": cfg.device, "precision": cfg.precision,
                "kind": ctx.partition.kind, "dim": self.output_schema(ctx).field("embedding").type.list_size}
