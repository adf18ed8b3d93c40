"""Reading a run's tables for the dashboard: column projections, row ranges, id look-ups.

Every read starts from the engine (``Engine.read`` for small tables, checksums verified;
``Engine.shard_refs`` for the images and embeddings tables, whose shards are read one column set
at a time so a page never hashes gigabytes of image bytes). Nothing here writes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.engine import Engine

ID_DTYPE = "S64"  # image ids are 64 hex digits: fixed-width bytes sort and search with numpy
WIDE_OUTPUTS = ("images", "embeddings")  # tables with big cells: read by column, never whole


def shard_path(ref) -> Path:
    return Path(ref.unit_dir) / ref.entry["file"]


def is_done(engine: Engine, stage: str) -> bool:
    return stage in engine.registry and engine.status(stage).state == "done"


def read_stage(engine: Engine, stage: str, columns: list[str], partition: str | None = None,
               filters: pc.Expression | None = None) -> Iterator[pa.Table]:
    """Shards of a done stage, only ``columns`` (and rows matching ``filters``): verified reads for small
    tables, column reads of the shard files for the images and embeddings tables."""
    if filters is None and engine.stage(stage).output not in WIDE_OUTPUTS:
        yield from engine.read(stage, partition=partition, columns=columns)
        return
    for ref in engine.shard_refs(stage, partition=partition):
        yield pq.read_table(shard_path(ref), columns=columns, filters=filters)


def read_stage_table(engine: Engine, stage: str, columns: list[str], partition: str | None = None,
                     filters: pc.Expression | None = None) -> pa.Table:
    tables = list(read_stage(engine, stage, columns, partition, filters))
    if tables:
        return pa.concat_tables(tables)
    schema = engine.stage(stage).schema
    return pa.schema([schema.field(c) for c in columns]).empty_table()


def id_array(values) -> np.ndarray:
    """Image ids (strings, an Arrow array or a list) as a fixed-width bytes array."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pylist()
    return np.array([v.encode("ascii") for v in values], dtype=ID_DTYPE) if len(values) else np.zeros(0, ID_DTYPE)


def find_sorted(sorted_ids: np.ndarray, image_id: str) -> int | None:
    """Position of ``image_id`` in a sorted id array, or None."""
    key = np.array([image_id.encode("ascii")], dtype=ID_DTYPE)
    i = int(np.searchsorted(sorted_ids, key)[0])
    return i if i < len(sorted_ids) and sorted_ids[i] == key[0] else None


def write_parquet(table: pa.Table, path: Path, row_group_size: int = 4096) -> None:
    """An index table with small row groups, so one page reads one or two of them."""
    pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


class RowReader:
    """Row ranges of one Parquet index file, reading only the row groups that hold them."""

    def __init__(self, path: Path):
        self.path = Path(path)
        meta = pq.read_metadata(self.path)
        self.schema = pq.read_schema(self.path)
        self.num_rows = meta.num_rows
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])

    def groups(self, start: int, stop: int) -> list[int]:
        """The row groups holding rows [start, stop) (non-empty range within the file)."""
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left")) - 1
        return list(range(first, last + 1))

    def rows(self, start: int, stop: int, columns: list[str] | None = None) -> pa.Table:
        start, stop = max(0, start), min(self.num_rows, stop)
        if stop <= start:
            return self.schema.empty_table() if columns is None else \
                pa.schema([self.schema.field(c) for c in columns]).empty_table()
        groups = self.groups(start, stop)
        first = groups[0]
        f = pq.ParquetFile(self.path)  # one handle per call: readers run in several threads
        try:
            t = f.read_row_groups(groups, columns=columns)
        finally:
            f.close()
        return t.slice(start - int(self._starts[first]), stop - start)
