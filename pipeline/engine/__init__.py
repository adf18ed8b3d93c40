"""The stage engine: written once, used by every stage, the CLI and the Prefect flows."""
from pipeline.engine.runner import Engine, StageError, StageStatus, Unit
from pipeline.engine.stage import REGISTRY, Partition, Shard, Stage, StageContext, register, stage_names
from pipeline.engine.store import CorruptShardError

__all__ = [
    "Engine", "StageError", "StageStatus", "Unit", "REGISTRY", "Partition", "Shard", "Stage", "StageContext",
    "register", "stage_names", "CorruptShardError",
]
