"""Curation stages. Importing this package registers them, in DAG order."""
from pipeline.stages import ingest  # noqa: F401  (isort: skip)
from pipeline.stages import hash_dedup  # noqa: F401  (isort: skip)
from pipeline.stages import nsfw  # noqa: F401  (isort: skip)
from pipeline.stages import face_blur  # noqa: F401  (isort: skip)
