"""What a stage declares, and the registry the engine and the flows iterate over."""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import pyarrow as pa
from pydantic import BaseModel

from pipeline.config import SOURCE_KINDS, Config, Source
from pipeline.engine import store

if TYPE_CHECKING:
    from pipeline.engine.runner import Engine


@dataclass(frozen=True)
class Partition:
    """One source: the unit of incremental work for per-source stages."""

    kind: str
    source: Source

    @property
    def name(self) -> str:
        return self.source.name


@dataclass(frozen=True)
class Shard:
    """One output shard to compute: its index and whatever the stage needs (picklable)."""

    index: int
    payload: Any = None


@dataclass
class StageContext:
    """What a stage's functions get: the run config, its section, its partition, the engine."""

    config: Config
    stage: "Stage"
    partition: Partition | None
    engine: "Engine"
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("lvd"))
    show_progress: bool = True
    unit_dir: Path | None = None  # set while computing
    memo: dict[str, Any] = field(default_factory=dict)  # what a stage's plan found, for its compute (one unit run)

    def write_artifact(self, name: str, data: bytes) -> None:
        """Store a file beside the shards (e.g. a fitted projection); listed, with its checksum, in the manifest."""
        if self.unit_dir is None or name not in self.stage.artifacts:
            raise ValueError(f"stage {self.stage.name!r} must declare artifact {name!r} and write it while computing")
        store.atomic_write_bytes(self.unit_dir / name, data)

    def link_artifact(self, name: str, src: Path) -> None:
        """Publish an existing (large) file as a declared artifact: hard-linked (or copied) atomically."""
        if self.unit_dir is None or name not in self.stage.artifacts:
            raise ValueError(f"stage {self.stage.name!r} must declare artifact {name!r} and write it while computing")
        store.atomic_link_file(Path(src), self.unit_dir / name)

    @property
    def work_dir(self) -> Path:
        """This unit's resumable working state (kept when a run is killed; cleared by --force)."""
        if self.unit_dir is None:
            raise ValueError("work_dir is only known while the stage is computing")
        path = self.unit_dir / store.WORK_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def section(self) -> BaseModel | None:
        return getattr(self.config, self.stage.section) if self.stage.section else None

    def read_upstream(self, stage: str, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Verified shards of an upstream stage (this partition's, for a per-source upstream)."""
        part = self.partition.name if self.partition and self.engine.stage(stage).per_source else None
        return self.engine.read(stage, partition=part, columns=columns)


class Stage(ABC):
    """Subclass, set the class attributes, implement ``plan`` and ``compute``, decorate with ``@register``."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    upstream: ClassVar[tuple[str, ...]] = ()
    section: ClassVar[str | None] = None
    per_source: ClassVar[bool] = False
    kinds: ClassVar[tuple[str, ...]] = SOURCE_KINDS
    schema: ClassVar[pa.Schema]
    count_by: ClassVar[tuple[str, ...]] = ()
    output: ClassVar[str] = "table"  # "images" (an images table), "decisions" (one row per input image), "table"
    artifacts: ClassVar[tuple[str, ...]] = ()  # extra files the stage writes with ctx.write_artifact
    fingerprint_exclude: ClassVar[frozenset[str]] = frozenset()
    description: ClassVar[str] = ""

    def output_schema(self, ctx: StageContext) -> pa.Schema:
        """The schema of this stage's shards (a stage whose columns depend on the config overrides this)."""
        return self.schema

    def fingerprint_inputs(self, ctx: StageContext) -> Any:
        """Extra material for the fingerprint (e.g. a digest of input files); None by default."""
        return None

    def config_for_fingerprint(self, ctx: StageContext) -> dict:
        section = ctx.section
        if section is None:
            return {}
        return {k: v for k, v in section.model_dump(mode="json").items() if k not in self.fingerprint_exclude}

    @abstractmethod
    def plan(self, ctx: StageContext) -> list[Shard]:
        """The full, deterministic list of shards of this unit (same inputs → same list)."""

    @abstractmethod
    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        """Compute the given shards; yield ``(index, table)`` as each completes, in any order."""


REGISTRY: dict[str, Stage] = {}


def register(cls: type[Stage], registry: dict[str, Stage] | None = None) -> type[Stage]:
    """Class decorator: add a stage to the DAG (its upstream stages must be registered first)."""
    registry = REGISTRY if registry is None else registry
    missing = [u for u in cls.upstream if u not in registry]
    if missing:
        raise ValueError(f"stage {cls.name!r} declares unknown upstream stage(s) {missing}")
    registry[cls.name] = cls()
    return cls


def stage_names() -> list[str]:
    """Every registered stage, upstream before downstream."""
    load_builtin_stages()
    return list(REGISTRY)


def load_builtin_stages() -> None:
    import pipeline.stages  # noqa: F401 - importing registers the stages


