"""`train` and `distill`: DINOv2 pretraining and distillation on Ray Train with FSDP2, as cached stages.

Both are one unit with one output shard (the metrics of the run, one row per logged step) plus
the result as artifacts: ``backbone.pth`` (official DINOv2 key layout), ``backbone_timm.pth``,
``model.json`` (architecture, timm name, dataset fingerprint), ``heads.pth``, ``ssl_config.json``
and ``summary.json``. Checkpoints live in the unit's work dir, so a killed run resumes from the
last one when the stage is run again; ``--force`` starts over. The training itself is
``model.train`` (this module only turns the config and the dataset into a ``TrainJob``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pyarrow as pa

from pipeline.config import Config, RayTrainConfig
from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.engine.runner import StageError
from pipeline.tables import TRAIN_METRICS_SCHEMA

EXPORT_FILES = ("backbone.pth", "backbone_timm.pth", "model.json", "heads.pth", "ssl_config.json")
# settings that change how a run is executed or watched, not what it computes
NOT_IN_FINGERPRINT = frozenset({"max_failures", "metrics_every", "checkpoint_every", "keep_checkpoints", "data",
                                "cpus_per_worker", "threads_per_worker", "knn_every", "knn_max_images"})


def dataset_files(ctx: StageContext) -> tuple[list[str], list[int]]:
    """The dataset stage's shards (paths, row counts), in order; empty shards left out."""
    files, rows = [], []
    for ref in ctx.engine.shard_refs("dataset"):
        if ref.entry["rows"]:
            files.append(str(Path(ref.unit_dir) / ref.entry["file"]))
            rows.append(int(ref.entry["rows"]))
    return files, rows


def check_ray_resources(section: RayTrainConfig) -> None:
    """Fail with what to change, instead of waiting forever for CPUs the Ray cluster does not have."""
    import ray

    need = section.workers * (section.cpus_per_worker + section.data.concurrency * section.data.num_cpus)
    have = ray.cluster_resources().get("CPU", 0.0)
    if need > have + 1e-9:
        raise StageError(f"training needs {need:g} Ray CPUs (workers × (cpus_per_worker + data.concurrency × "
                         f"data.num_cpus)) but the Ray cluster has {have:g}: lower train.workers / "
                         f"train.cpus_per_worker / train.data.num_cpus, or set ray.num_cpus (local Ray) higher")
    if section.use_gpu and ray.cluster_resources().get("GPU", 0.0) < section.workers:
        raise StageError(f"use_gpu is set but the Ray cluster has {ray.cluster_resources().get('GPU', 0):g} GPUs "
                         f"for {section.workers} workers")


def knn_monitor(config: Config, section: RayTrainConfig):
    from model.train.job import KnnMonitor

    if section.knn_every <= 0:
        return None
    if config.eval.train is None or config.eval.val is None:
        raise StageError("knn_every is set but eval.train / eval.val (labelled ImageFolders) are not")
    return KnnMonitor(train_dir=str(config.eval.train), val_dir=str(config.eval.val), every=section.knn_every,
                      crop_size=section.ssl.crops.global_crops_size, max_images=section.knn_max_images)


class _TrainingStage(Stage):
    """Shared by `train` and `distill`: build the job, run it on Ray Train, publish the result."""

    section_kind: str = "pretrain"
    schema = TRAIN_METRICS_SCHEMA
    artifacts = (*EXPORT_FILES, "summary.json")
    fingerprint_exclude = NOT_IN_FINGERPRINT

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def ssl_json(self, ctx: StageContext) -> dict:
        return ctx.section.ssl.model_dump(mode="json")

    def teacher_dir(self, ctx: StageContext) -> str | None:
        return None

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        from model.train.job import DataSettings, TrainJob
        from model.train.trainer import Scaling, run_job
        from pipeline.raydata import ensure_ray

        section: RayTrainConfig = ctx.section
        files, rows = dataset_files(ctx)
        if not files:
            raise StageError("the dataset stage kept no images: nothing to train on (check `lvd status`)")
        ensure_ray(ctx.config)
        check_ray_resources(section)
        job = TrainJob(
            kind=self.section_kind, ssl=self.ssl_json(ctx), files=files, rows=rows, out_dir=str(ctx.work_dir),
            checkpoint_every=section.checkpoint_every, keep_checkpoints=section.keep_checkpoints,
            metrics_every=section.metrics_every, highres_fraction=section.highres.fraction,
            highres_global_size=section.highres.global_crops_size, highres_local_size=section.highres.local_crops_size,
            precision=section.precision, fsdp=section.fsdp, threads_per_worker=section.threads_per_worker,
            data=DataSettings(**section.data.model_dump()), knn=knn_monitor(ctx.config, section),
            teacher_dir=self.teacher_dir(ctx),
            export_extra={"dataset_fingerprint": ctx.engine.stage_fingerprint("dataset"), "config_name": ctx.config.name},
        )
        scaling = Scaling(workers=section.workers, use_gpu=section.use_gpu, cpus_per_worker=section.cpus_per_worker,
                          max_failures=section.max_failures)
        outcome = run_job(job, scaling, name=f"{self.name}-{ctx.config.name}", progress=ctx.show_progress)
        for name in EXPORT_FILES:
            src = job.export_dir / name
            if src.is_file():
                ctx.link_artifact(name, src)
            else:  # an architecture without a timm equivalent: model.json says why
                ctx.write_artifact(name, b"")
        summary = {**outcome.summary, "workers": section.workers, "fsdp": section.fsdp, "kind": self.section_kind,
                   "arch": section.ssl.student.arch, "dataset_images": sum(rows)}
        ctx.write_artifact("summary.json", (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode())
        yield 0, metrics_table(outcome.metrics)


def metrics_table(records: list[dict]) -> pa.Table:
    cols = {f.name: [r.get(f.name) for r in records] for f in TRAIN_METRICS_SCHEMA}
    return pa.table(cols, schema=TRAIN_METRICS_SCHEMA)


@register
class Train(_TrainingStage):
    name = "train"
    version = 1
    upstream = ("dataset",)
    section = "train"
    section_kind = "pretrain"
    description = "DINOv2 pretraining (DINO + iBOT + KoLeo) on Ray Train with FSDP2"


@register
class Distill(_TrainingStage):
    name = "distill"
    version = 1
    upstream = ("train",)
    section = "distill"
    section_kind = "distill"
    description = "a frozen teacher distilled into a smaller student; the student's EMA is the result"

    def teacher_dir(self, ctx: StageContext) -> str:
        given = ctx.section.teacher
        return str(given) if given is not None else str(ctx.engine.artifact_dir("train"))

    def ssl_json(self, ctx: StageContext) -> dict:
        """The student's recipe with the teacher's prototype counts (its targets live in the teacher's prototype space)."""
        from model.train.teacher import SSL_CONFIG_FILE

        ssl = ctx.section.ssl
        teacher_cfg = Path(self.teacher_dir(ctx)) / SSL_CONFIG_FILE
        if teacher_cfg.is_file():
            t = json.loads(teacher_cfg.read_text())
            ssl = ssl.with_updates(dino={"head_n_prototypes": t["dino"]["head_n_prototypes"]},
                                   ibot={k: t["ibot"][k] for k in ("separate_head", "head_n_prototypes")})
        return ssl.model_dump(mode="json")

    def fingerprint_inputs(self, ctx: StageContext):
        """An external teacher is part of what is computed: its model.json (with its checksum-bearing fields)."""
        given = ctx.section.teacher
        if given is None:
            return None
        meta = Path(given) / "model.json"
        return meta.read_text() if meta.is_file() else str(given)
