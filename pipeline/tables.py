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


def embeddings_schema(dim: int | None = None) -> pa.Schema:
    """image_id, source, kind, the L2-normalised float16 vector (fixed size ``dim``), the model spec."""
    vec = pa.list_(pa.float16(), dim) if dim else pa.list_(pa.float16())
    return pa.schema([
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("embedding", vec),
        pa.field("model", pa.string()),
    ])


CLUSTERS_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("cluster", pa.int32(), nullable=False),          # level-1 (finest) cluster
    pa.field("similarity", pa.float32()),                      # cosine to its centroid
    pa.field("clusters", pa.list_(pa.int32())),                # every level, finest first (hierarchical)
])

RETRIEVAL_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),         # the retrieved uncurated image
    pa.field("source", pa.string(), nullable=False),           # its source
    pa.field("query_source", pa.string(), nullable=False),     # the curated source that retrieved it
    pa.field("query_id", pa.string()),                         # the curated image (null: cluster-level hit)
    pa.field("rank", pa.int32()),
    pa.field("similarity", pa.float32()),
    pa.field("method", pa.string()),                           # sample | cluster
    pa.field("cluster", pa.int32()),
])

PROVENANCE = pa.struct([("query_source", pa.string()), ("query_id", pa.string()), ("rank", pa.int32()),
                        ("similarity", pa.float32()), ("method", pa.string())])

DATASET_SCHEMA = pa.schema([
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("source", pa.string(), nullable=False),
    pa.field("origin", pa.string(), nullable=False),           # curated | retrieved
    pa.field("url", pa.string()),
    pa.field("cluster", pa.int32()),                           # null for curated images
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("retrieved_by", pa.list_(PROVENANCE)),            # every query that retrieved it
])

# train / distill: one row per logged step (worker-averaged loss terms and scheduled values)
TRAIN_METRICS_SCHEMA = pa.schema([
    ("step", pa.int64()), ("total", pa.float64()), ("dino", pa.float64()), ("ibot", pa.float64()),
    ("koleo", pa.float64()), ("lr", pa.float64()), ("wd", pa.float64()), ("momentum", pa.float64()),
    ("teacher_temp", pa.float64()), ("teacher_entropy", pa.float64()), ("teacher_batch_entropy", pa.float64()),
    ("images_per_s", pa.float64()), ("knn_top1", pa.float64()), ("global_crops_size", pa.int32()),
])

# eval: one row per (model, method, setting)
EVAL_SCHEMA = pa.schema([
    ("model", pa.string()), ("method", pa.string()), ("setting", pa.string()), ("top1", pa.float64()),
    ("top5", pa.float64()), ("n_train", pa.int64()), ("n_val", pa.int64()), ("n_classes", pa.int32()),
    ("checkpoint", pa.string()),
])
