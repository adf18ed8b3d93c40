"""Curation stages. Importing this package registers them, upstream first."""
from pipeline.stages import ingest  # noqa: F401
