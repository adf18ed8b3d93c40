""""The images kept so far": the one way downstream stages read filtered images.

For a stage S and a source: take the latest images-table stage among S's upstream stages that
covers the source (e.g. ``face_blur`` for uncurated sources, ``ingest`` for curated ones), keep
rows with status ``ok``, and drop every image that a decisions stage upstream of S removed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from pipeline.engine.runner import Engine


def _covers(engine: "Engine", stage: str, kind: str) -> bool:
    return kind in engine.stage(stage).kinds


def images_stage(engine: "Engine", upto: str, kind: str) -> str:
    """The latest upstream images-table stage of ``upto`` that processes sources of ``kind``."""
    closure = engine.upstream_closure(upto)[:-1]
    found = [s for s in closure if engine.stage(s).output == "images" and _covers(engine, s, kind)]
    if not found:
        raise ValueError(f"stage {upto!r} has no upstream images stage for {kind} sources")
    return found[-1]


def removed_ids(engine: "Engine", upto: str, source: str, kind: str) -> pa.Array:
    """Image ids of ``source`` removed by any decisions stage upstream of ``upto``."""
    removed = []
    for s in engine.upstream_closure(upto)[:-1]:
        st = engine.stage(s)
        if st.output != "decisions" or not _covers(engine, s, kind):
            continue
        part = source if st.per_source else None
        for t in engine.read(s, partition=part, columns=["image_id", "source", "decision"]):
            mask = pc.and_(pc.equal(t["decision"], "removed"), pc.equal(t["source"], source))
            removed.append(t["image_id"].filter(mask))
    return pa.chunked_array([c for a in removed for c in a.chunks], type=pa.string()).combine_chunks()


def source_kind(engine: "Engine", source: str) -> str:
    """The kind (uncurated / curated / eval) of a configured source."""
    for kind, src in engine.config.sources.all():
        if src.name == source:
            return kind
    raise KeyError(f"no source named {source!r} in the config")


def kept_rows(engine: "Engine", upto: str, source: str, columns: list[str] | None = None,
              table: str | None = None) -> Iterator[pa.Table]:
    """Shards of ``source`` kept by every filter upstream of ``upto`` (status ok where the table has
    one, and not removed): of its latest upstream images table, or of the per-image stage ``table``."""
    kind = source_kind(engine, source)
    stage = table or images_stage(engine, upto, kind)
    gone = removed_ids(engine, upto, source, kind)
    has_status = "status" in engine.stage(stage).schema.names if engine.stage(stage).schema is not None else False
    read_cols = None if columns is None else sorted(set(columns) | {"image_id"} | ({"status"} if has_status else set()))
    part = source if engine.stage(stage).per_source else None
    for t in engine.read(stage, partition=part, columns=read_cols):
        keep = pc.invert(pc.is_in(t["image_id"], value_set=gone))
        if has_status:
            keep = pc.and_(pc.equal(t["status"], "ok"), keep)
        t = t.filter(keep)
        yield t if columns is None else t.select(columns)
