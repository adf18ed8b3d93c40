"""The shape shared by per-image stages: one output shard per upstream shard, mapped on Ray Data.

A subclass names its upstream images stage, the batch class (an actor: its model loads once),
the input columns, and how to build the class's keyword arguments from the config.
"""
from __future__ import annotations

from typing import Any, ClassVar, Iterator

import pyarrow as pa

from pipeline.digest import sha256_file
from pathlib import Path

from pipeline.engine import Shard, Stage, StageContext, StageError
from pipeline.raydata import RAY_ONLY, ensure_ray, map_shards



class PerImageStage(Stage):
    per_source = True
    kinds = ("uncurated",)
    source_stage: ClassVar[str] = "ingest"
    batch_class: ClassVar[type]
    input_columns: ClassVar[list[str]] = ["image_id", "source", "image"]
    fingerprint_exclude = RAY_ONLY

    def batch_kwargs(self, ctx: StageContext) -> dict[str, Any]:
        """Keyword arguments of the batch class's constructor."""
        return {}

    def config_for_fingerprint(self, ctx: StageContext) -> dict:
        cfg = super().config_for_fingerprint(ctx)
        model = getattr(ctx.section, "model", None)
        if isinstance(model, Path):
            if not model.is_file():
                raise StageError(f"{self.name}.model: {model} does not exist (give the path of the ONNX weights)")
            cfg["model"] = "sha256:" + sha256_file(model)  # the weights, not where they lie
        return cfg

    def plan(self, ctx: StageContext) -> list[Shard]:
        assert ctx.partition is not None
        refs = ctx.engine.shard_refs(self.source_stage, partition=ctx.partition.name)
        return [Shard(i, ref) for i, ref in enumerate(refs)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        ensure_ray(ctx.config)
        yield from map_shards([(s.index, s.payload) for s in shards], self.batch_class, ctx.section, self.schema,
                              fn_kwargs=self.batch_kwargs(ctx), columns=self.input_columns, only_ok=True)
