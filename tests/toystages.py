"""Small deterministic stages for engine tests, in their own registry (not the real DAG).

`numbers` → `scaled` (reads the `ingest.encode_quality` setting as its factor) → `total`.
TOY_SLEEP (seconds per shard) slows `numbers` down so a test can kill it mid-stage.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import parse_config
from pipeline.engine import Engine, Shard, Stage, StageContext, register

REGISTRY: dict[str, Stage] = {}
SCHEMA = pa.schema([pa.field("image_id", pa.string()), pa.field("value", pa.int64())])
N_SHARDS, ROWS = 6, 10


class Numbers(Stage):
    name = "numbers"
    schema = SCHEMA
    calls: list[int] = []

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(i, i) for i in range(N_SHARDS)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        delay = float(os.environ.get("TOY_SLEEP", "0"))
        for s in shards:
            Numbers.calls.append(s.index)
            print(f"computing shard {s.index}", file=sys.stderr, flush=True)
            time.sleep(delay)
            vals = list(range(s.index * ROWS, (s.index + 1) * ROWS))
            yield s.index, pa.table({"image_id": [f"{v:05d}" for v in vals], "value": vals}, schema=SCHEMA)


class Scaled(Stage):
    name = "scaled"
    upstream = ("numbers",)
    section = "ingest"
    schema = SCHEMA
    calls: list[int] = []

    def config_for_fingerprint(self, ctx: StageContext) -> dict:
        return {"factor": ctx.section.encode_quality}

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        Scaled.calls.append(0)
        t = pa.concat_tables(ctx.read_upstream("numbers"))
        yield 0, t.set_column(1, "value", pc.multiply(t["value"], ctx.section.encode_quality))


class Total(Stage):
    name = "total"
    upstream = ("scaled",)
    schema = SCHEMA
    count_by = ("image_id",)
    artifacts = ("total.txt",)
    calls: list[int] = []

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        Total.calls.append(0)
        total = sum(pc.sum(t["value"]).as_py() for t in ctx.read_upstream("scaled"))
        yield 0, pa.table({"image_id": ["total"], "value": [total]}, schema=SCHEMA)
        ctx.write_artifact("total.txt", f"{total}\n".encode())  # after its only shard: a kill can fall between


for _cls in (Numbers, Scaled, Total):
    register(_cls, REGISTRY)


def toy_engine(root: str, factor: int = 2, verify: str = "checksum") -> Engine:
    cfg = parse_config({"root": str(root), "ingest": {"encode_quality": factor}, "engine": {"verify": verify}},
                       base=os.getcwd())
    return Engine(cfg, show_progress=False, registry=REGISTRY)


if __name__ == "__main__":  # used by the kill-and-resume test: python tests/toystages.py ROOT
    logging_root = sys.argv[1]
    toy_engine(logging_root).ensure("numbers")
