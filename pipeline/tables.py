"""Arrow schemas of the tables in DESIGN.md ("Tables")."""
from __future__ import annotations

import pyarrow as pa

IMAGES_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),   # hex sha256 of the source URL / file URI
    pa.field("url", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("kind", pa.string(), nullable=False),       # uncurated | curated | eval
    pa.field("status", pa.string(), nullable=False),     # ok | an error class
    pa.field("error", pa.string()),
    pa.field("sha256", pa.string()),                     # of the stored bytes
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("image", pa.binary()),                      # re-encoded JPEG/WebP
    pa.field("origin", pa.string()),                     # url | warc | file
    pa.field("final_url", pa.string()),                  # after redirects
    pa.field("http_status", pa.int32()),
])


def rows_table(rows: list[dict], schema: pa.Schema) -> pa.Table:
    """Rows (dicts keyed by column; missing keys → null) as a table of ``schema`` sorted by image_id."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    return pa.table({f.name: [r.get(f.name) for r in rows] for f in schema}, schema=schema)


def images_table(rows: list[dict]) -> pa.Table:
    """Rows of the images table, sorted by image_id."""
    return rows_table(rows, IMAGES_SCHEMA)

DECISIONS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),     # the image's source (filters read one source's rows)
    pa.field("stage", pa.string(), nullable=False),
    pa.field("decision", pa.string(), nullable=False),   # kept | removed
    pa.field("reason", pa.string()),                     # why removed (or a note when kept)
    pa.field("score", pa.float64()),                     # e.g. nsfw score, Hamming distance to ref_id
    pa.field("ref_id", pa.string()),                     # e.g. the representative an image duplicates
])

FACE_BOX = pa.list_(pa.int32(), 4)                       # x, y, w, h in stored-image pixels (margin included)
BLURRED_IMAGES_SCHEMA = IMAGES_SCHEMA.append(pa.field("faces", pa.int32())).append(
    pa.field("face_boxes", pa.list_(FACE_BOX)))


def decisions_table(rows: list[dict]) -> pa.Table:
    """Rows of the decisions table, sorted by image_id."""
    return rows_table(rows, DECISIONS_SCHEMA)
