"""`dataset`: the LVD-style dataset on Parquet, with per-image provenance and a dataset card.

Every kept curated image (``origin: curated``) and every retrieved uncurated image, once
(``origin: retrieved``, with every query that retrieved it in ``retrieved_by`` and its cluster).
One output shard per input shard of the images it comes from (``ingest`` for curated sources,
``face_blur``'s blurred bytes for uncurated ones), so it streams. ``dataset_card.md`` and
``summary.json`` are written beside the shards: counts per source and per stage (from the
decisions table), the cluster size histogram, and the embedding model.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.engine.kept import images_stage, removed_ids
from pipeline.tables import DATASET_SCHEMA, PROVENANCE

DECISION_STAGES = ("hash_dedup", "nsfw", "copy_dedup")


@register
class Dataset(Stage):
    name = "dataset"
    version = 1
    upstream = ("retrieve",)
    section = "dataset"
    schema = DATASET_SCHEMA
    count_by = ("origin", "source")
    artifacts = ("dataset_card.md", "summary.json")
    description = "the LVD-style dataset: curated images plus retrieved ones, with provenance and a card"

    def plan(self, ctx: StageContext) -> list[Shard]:
        shards = []
        for kind, src in ctx.config.sources.all():
            if kind == "eval":
                continue
            stage = images_stage(ctx.engine, self.name, kind)
            for ref in ctx.engine.shard_refs(stage, partition=src.name):
                shards.append(Shard(len(shards), (kind, src.name, ref)))
        return shards or [Shard(0, None)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        provenance = self._provenance(ctx)
        self._write_card(ctx, provenance)  # before any shard: a run killed after its last shard must not lack the card
        clusters = dict(zip(*[c.to_pylist() for c in pa.concat_tables(
            ctx.engine.read("cluster", columns=["image_id", "cluster"])).columns])) if ctx.engine.units("cluster") else {}
        removed = {}
        for s in shards:
            if s.payload is None:
                yield s.index, DATASET_SCHEMA.empty_table()
                continue
            kind, source, ref = s.payload
            if source not in removed:
                removed[source] = removed_ids(ctx.engine, self.name, source, kind)
            yield s.index, self._rows(ref.read(), kind, removed[source], provenance, clusters)

    def _provenance(self, ctx: StageContext) -> dict[str, list[dict]]:
        """image_id → every retrieval row of it (the queries that retrieved it)."""
        out: dict[str, list[dict]] = defaultdict(list)
        for t in ctx.engine.read("retrieve", columns=["image_id", "query_source", "query_id", "rank", "similarity",
                                                      "method"]):
            for r in t.to_pylist():
                out[r.pop("image_id")].append(r)
        return out

    def _rows(self, t: pa.Table, kind: str, gone: pa.Array, provenance: dict, clusters: dict) -> pa.Table:
        keep = pc.and_(pc.equal(t["status"], "ok"), pc.invert(pc.is_in(t["image_id"], value_set=gone)))
        if kind == "uncurated":
            keep = pc.and_(keep, pc.is_in(t["image_id"], value_set=pa.array(list(provenance), pa.string())))
        t = t.filter(keep)
        ids = t["image_id"].to_pylist()
        origin = "curated" if kind == "curated" else "retrieved"
        return pa.table({
            "image_id": t["image_id"], "image": t["image"], "source": t["source"],
            "origin": pa.array([origin] * len(ids), pa.string()), "url": t["url"],
            "cluster": pa.array([clusters.get(i) if kind == "uncurated" else None for i in ids], pa.int32()),
            "width": t["width"], "height": t["height"],
            "retrieved_by": pa.array([provenance.get(i, []) for i in ids], pa.list_(PROVENANCE)),
        }, schema=DATASET_SCHEMA)

    def _write_card(self, ctx: StageContext, provenance: dict) -> None:
        summary = dataset_summary(ctx, provenance)
        ctx.write_artifact("summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        ctx.write_artifact("dataset_card.md", render_card(summary).encode())


def dataset_summary(ctx: StageContext, provenance: dict) -> dict:
    """Counts per source and stage, the cluster size histogram, and the embedding model (JSON-able)."""
    eng = ctx.engine
    sources = {}
    for kind, src in ctx.config.sources.all():
        statuses = Counter(eng.read_table("ingest", src.name, ["status"])["status"].to_pylist())
        entry = {"kind": kind, "inputs": sum(statuses.values()), "ingest_status": dict(sorted(statuses.items()))}
        if kind == "uncurated":
            removed = {}
            for stage in DECISION_STAGES:
                t = eng.read_table(stage, columns=["source", "decision", "reason"])
                t = t.filter(pc.and_(pc.equal(t["source"], src.name), pc.equal(t["decision"], "removed")))
                removed[stage] = dict(sorted(Counter(t["reason"].to_pylist()).items()))
            entry["removed"] = removed
        sources[src.name] = entry
    by_source: Counter[str] = Counter()  # unique retrieved images per uncurated source
    for t in eng.read("retrieve", columns=["image_id", "source"]):
        for image_id, source in set(zip(*[c.to_pylist() for c in t.columns])):
            by_source[source] += 1
    for name, entry in sources.items():
        if entry["kind"] == "uncurated":
            entry["retrieved"] = by_source.get(name, 0)
    sizes = Counter(eng.read_table("cluster", columns=["cluster"])["cluster"].to_pylist())
    hist = Counter(min(int(np.log2(s)) if s else 0, 20) for s in sizes.values())
    embed = ctx.config.embed.model
    return {
        "sources": sources,
        "clusters": {"count": len(sizes), "size_histogram_log2": {f"{2**k}-{2**(k+1)-1}": v for k, v in sorted(hist.items())}},
        "embedding_model": embed,
        "random_weights": embed.rstrip().endswith(":none"),
        "retrieval": {"queries_by_source": dict(Counter(r["query_source"] for rows in provenance.values() for r in rows))},
    }


def render_card(summary: dict) -> str:
    """The dataset card (Markdown) from the summary."""
    lines = ["# Dataset card", "", f"Embedding model: `{summary['embedding_model']}`"
             + (" — **random weights (pretrained: none)**: retrieval is not meaningful" if summary["random_weights"] else ""),
             "", "| source | kind | inputs | ok | removed (stage: reason=count) | retrieved |", "|---|---|---|---|---|---|"]
    for name, s in summary["sources"].items():
        removed = "; ".join(f"{st}: " + ", ".join(f"{r}={c}" for r, c in rs.items()) for st, rs in s.get("removed", {}).items() if rs)
        lines.append(f"| {name} | {s['kind']} | {s['inputs']} | {s['ingest_status'].get('ok', 0)} | {removed or '-'} | "
                     f"{s.get('retrieved', '-')} |")
    lines += ["", f"Clusters: {summary['clusters']['count']}; sizes (log2 buckets): "
              + ", ".join(f"{k}: {v}" for k, v in summary["clusters"]["size_histogram_log2"].items()), ""]
    return "\n".join(lines) + "\n"
