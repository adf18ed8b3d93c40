"""`ingest`: crawl URL lists and WARCs, read local folders, decode, validate, store images.

Per-source stage: each source is a partition with its own fingerprint (config + a digest of the
source's input files), so adding a source crawls only that source. Every input item yields
exactly one row: ``status`` is ``ok`` or the class of the failure, never a silent drop.
"""
from __future__ import annotations

from typing import Iterator

import pyarrow as pa
from tqdm.auto import tqdm

from pipeline.crawl import CrawlShard, crawl_shards
from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.sources import iter_source_items, source_digest
from pipeline.tables import IMAGES_SCHEMA

# Settings that change how fast we crawl, not what we store: excluded from the fingerprint.
THROUGHPUT_ONLY = frozenset({"concurrency", "per_host_concurrency", "decode_workers", "shards_in_flight"})


@register
class Ingest(Stage):
    name = "ingest"
    version = 1
    section = "ingest"
    per_source = True
    schema = IMAGES_SCHEMA
    output = "images"
    count_by = ("status",)
    fingerprint_exclude = THROUGHPUT_ONLY
    description = "polite crawl of URL lists / WARCs and local folders into the images table"

    def fingerprint_inputs(self, ctx: StageContext) -> str:
        assert ctx.partition is not None
        return source_digest(ctx.partition.source)

    def plan(self, ctx: StageContext) -> list[Shard]:
        """Items sorted by image_id, cut into shards of ``engine.shard_rows``."""
        assert ctx.partition is not None
        items = sorted(iter_source_items(ctx.partition.source), key=lambda it: it.image_id)
        n = ctx.config.engine.shard_rows
        chunks = [tuple(items[i:i + n]) for i in range(0, len(items), n)] or [()]
        return [Shard(i, chunk) for i, chunk in enumerate(chunks)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        assert ctx.partition is not None
        empty = [s for s in shards if not s.payload]
        for s in empty:
            yield s.index, IMAGES_SCHEMA.empty_table()
        todo = [CrawlShard(s.index, s.payload) for s in shards if s.payload]
        total = sum(len(s.items) for s in todo)
        with tqdm(total=total, desc=f"ingest[{ctx.partition.name}]", unit="img",
                  disable=None if ctx.show_progress else True) as bar:
            ok = 0

            def on_item(status: str) -> None:
                nonlocal ok
                ok += status == "ok"
                bar.update(1)
                bar.set_postfix(ok=ok, refresh=False)

            yield from crawl_shards(ctx.section, ctx.partition.name, ctx.partition.kind, todo, on_item)
