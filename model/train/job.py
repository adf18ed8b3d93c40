"""What one Ray Train run is asked to do (``TrainJob``): plain data, picklable and JSON-able.

The same job type drives pretraining (``kind="pretrain"``: ``SSLMetaArch``, EMA teacher) and
distillation (``kind="distill"``: ``DistillMetaArch``, a frozen teacher loaded from
``teacher_dir``); everything else — Ray Train, FSDP2, data streaming, checkpoints, resume,
monitoring, export — is shared (``model.train.worker`` / ``model.train.trainer``).

Iterations: ``ssl.optim.epochs × ssl.train.official_epoch_length`` (an "epoch" is a stated number
of iterations, not a pass over the data). High-resolution adaptation: the last
``highres_fraction`` of the iterations use ``highres_global_size`` global crops (and
``highres_local_size`` local crops when set); position embeddings are interpolated by the ViT.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from model.ssl.config import SSLConfig


@dataclass(frozen=True)
class KnnMonitor:
    """Online kNN of the teacher on a labelled ImageFolder pair, every ``every`` steps (0 = off)."""

    train_dir: str
    val_dir: str
    every: int = 0
    k: int = 20
    temperature: float = 0.07
    crop_size: int = 224
    max_images: int = 2000  # per split, so monitoring stays cheap


@dataclass(frozen=True)
class DataSettings:
    """Ray Data settings of each worker's input pipeline."""

    num_cpus: float = 0.5
    concurrency: int = 1
    prefetch: int = 2


@dataclass(frozen=True)
class TrainJob:
    kind: Literal["pretrain", "distill"]
    ssl: dict[str, Any]  # SSLConfig as JSON
    files: list[str]  # dataset Parquet shards (column `image`)
    rows: list[int]
    out_dir: str  # checkpoints/, metrics.jsonl, export/ (shared storage on a cluster)
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    metrics_every: int = 10
    highres_fraction: float = 0.0
    highres_global_size: int = 518
    highres_local_size: int | None = None
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    fsdp: bool = True
    threads_per_worker: int | None = None
    data: DataSettings = field(default_factory=DataSettings)
    knn: KnnMonitor | None = None
    teacher_dir: str | None = None  # distill: an export dir of `lvd train` (backbone + heads)
    export_extra: dict[str, Any] = field(default_factory=dict)  # e.g. the dataset fingerprint

    # ---------------------------------------------------------------- derived
    @property
    def ssl_config(self) -> SSLConfig:
        return SSLConfig.model_validate(self.ssl)

    @property
    def total_steps(self) -> int:
        c = self.ssl_config
        return c.optim.epochs * c.train.official_epoch_length

    @property
    def highres_start(self) -> int | None:
        """First step of the high-resolution phase (None when there is none)."""
        if self.highres_fraction <= 0:
            return None
        return self.total_steps - max(1, math.ceil(round(self.highres_fraction * self.total_steps, 6)))

    def crop_sizes(self, step: int) -> tuple[int, int]:
        """(global, local) crop sizes at ``step``."""
        c = self.ssl_config.crops
        start = self.highres_start
        if start is not None and step >= start:
            return self.highres_global_size, self.highres_local_size or c.local_crops_size
        return c.global_crops_size, c.local_crops_size

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.out_dir) / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        return Path(self.out_dir) / "metrics.jsonl"

    @property
    def export_dir(self) -> Path:
        return Path(self.out_dir) / "export"

    @property
    def diverged_path(self) -> Path:
        return Path(self.out_dir) / "diverged.json"

    def validate(self) -> None:
        """Clear errors for jobs that cannot run."""
        if len(self.files) != len(self.rows):
            raise ValueError("files and rows differ in length")
        if not self.files or sum(self.rows) == 0:
            raise ValueError("the training dataset is empty: the `dataset` stage kept no images")
        if self.kind == "distill" and not self.teacher_dir:
            raise ValueError("distillation needs teacher_dir (an `lvd train` export)")
        if not 0.0 <= self.highres_fraction < 1.0:
            raise ValueError("highres_fraction must be in [0, 1)")
        p = self.ssl_config.student.patch_size
        for size in (self.highres_global_size,) if self.highres_start is not None else ():
            if size % p:
                raise ValueError(f"highres_global_size {size} is not a multiple of the patch size {p}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainJob":
        d = dict(d)
        d["data"] = DataSettings(**d.get("data") or {})
        d["knn"] = KnnMonitor(**d["knn"]) if d.get("knn") else None
        return cls(**d)
