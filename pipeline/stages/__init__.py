"""The stages of the DAG (curation, then train, distill, eval). Importing this package registers them, in DAG order."""
from pipeline.stages import ingest  # noqa: F401  (isort: skip)
from pipeline.stages import hash_dedup  # noqa: F401  (isort: skip)
from pipeline.stages import nsfw  # noqa: F401  (isort: skip)
from pipeline.stages import face_blur  # noqa: F401  (isort: skip)
from pipeline.stages import embed  # noqa: F401  (isort: skip)
from pipeline.stages import copy_dedup  # noqa: F401  (isort: skip)
from pipeline.stages import cluster  # noqa: F401  (isort: skip)
from pipeline.stages import retrieve  # noqa: F401  (isort: skip)
from pipeline.stages import dataset  # noqa: F401  (isort: skip)
from pipeline.stages import train  # noqa: F401  (isort: skip)  registers train and distill
from pipeline.stages import evaluate  # noqa: F401  (isort: skip)  registers eval
