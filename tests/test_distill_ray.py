"""Distillation on Ray Train (2 CPU workers, FSDP2): a trained tiny teacher into a tinier student.

The teacher is the tiny ViT trained on 16 real photos (tests/tinyssl.py, shared with the local
training test), exported as `lvd train` exports it (backbone + heads + config). The student (dim 32
instead of 64) learns the frozen teacher's DINO/iBOT targets on the same photos, streamed from
Parquet through Ray Data; its EMA is the result. Its kNN accuracy on labelled crops must beat the
same student architecture at random initialisation.
"""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from model.export import load_backbone
from model.ssl.distill_arch import DistillMetaArch, teacher_modules
from model.train.job import TrainJob
from model.train.teacher import export_result
from model.train.trainer import Scaling, run_job
from photos import jpeg
from tinyssl import backbone_knn

STEPS = 100


def test_distilled_student_beats_its_random_init(ray_session, trained_tiny_teacher, tmp_path):
    t = trained_tiny_teacher
    x, y, labelled = t.eval_set
    teacher = t.result.model.teacher
    # the teacher as `lvd train` leaves it
    teacher_job = TrainJob(kind="pretrain", ssl=t.cfg.model_dump(mode="json"), files=["-"], rows=[1],
                           out_dir=str(tmp_path / "teacher"))
    export_result(teacher_job, {name: {k: v.detach().clone() for k, v in m.state_dict().items()}
                                for name, m in teacher.items()})
    # the photos as a dataset (2 Parquet shards)
    files, rows = [], []
    for part, images in enumerate((t.images[:8], t.images[8:])):
        path = tmp_path / f"part-{part:05d}.parquet"
        pq.write_table(pa.table({"image_id": [f"{part}-{i}" for i in range(len(images))],
                                 "image": [jpeg(im) for im in images]}), path)
        files.append(str(path))
        rows.append(len(images))

    student_cfg = t.cfg.with_updates(
        student={"backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        train={"batch_size_per_gpu": 8, "official_epoch_length": 10},  # 2 workers × 8 = the teacher's batch of 16
        optim={"epochs": STEPS // 10, "warmup_epochs": 1, "lr": 2e-3, "min_lr": 1e-4},
        teacher={"momentum_teacher": 0.9},
    )
    job = TrainJob(kind="distill", ssl=student_cfg.model_dump(mode="json"), files=files, rows=rows,
                   out_dir=str(tmp_path / "distill"), teacher_dir=str(teacher_job.export_dir),
                   checkpoint_every=50, metrics_every=10, threads_per_worker=1)
    outcome = run_job(job, Scaling(workers=2, cpus_per_worker=0.5), progress=False)
    assert [r["step"] for r in outcome.metrics][-1] == STEPS - 1

    # the random-init baseline: the same student architecture, same seed, before any step
    torch.manual_seed(student_cfg.train.seed)
    backbone, heads = teacher["backbone"], {k: m.state_dict() for k, m in teacher.items() if k != "backbone"}
    baseline = DistillMetaArch(student_cfg, teacher_modules(t.cfg, backbone, heads)).student_ema["backbone"]
    acc_random = backbone_knn(baseline, x, y, labelled)
    student = load_backbone(outcome.export["export_dir"])
    assert student.embed_dim == 32
    acc_student = backbone_knn(student, x, y, labelled)
    print(f"\ndistill: student kNN random-init={acc_random:.3f} distilled={acc_student:.3f} "
          f"(teacher {t.acc_trained:.3f}); loss {outcome.summary['first_loss']:.3f} → {outcome.summary['last_loss']:.3f}")
    assert acc_student > acc_random + 0.06, (acc_random, acc_student)
    assert outcome.summary["last_loss"] < outcome.summary["first_loss"]
