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


def images_table(rows: list[dict]) -> pa.Table:
    """Rows (dicts with IMAGES_SCHEMA keys; missing keys → null) as a table sorted by image_id."""
    rows = sorted(rows, key=lambda r: r["image_id"])
    cols = {f.name: [r.get(f.name) for r in rows] for f in IMAGES_SCHEMA}
    return pa.table(cols, schema=IMAGES_SCHEMA)
