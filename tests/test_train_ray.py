"""Ray Train + FSDP2 pretraining: 2 CPU workers, metrics, checkpoints, exact resume after a killed worker.

Real components: the session's local Ray, Ray Train's TorchTrainer (gloo), FSDP2, DCP checkpoints,
the Ray Data input pipeline. The dataset is 20 real photos (shipped in scikit-image/scikit-learn) in
two Parquet shards.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from model.ssl.config import SSLConfig
from model.train.checkpoint import latest_checkpoint, read_state
from model.train.job import KnnMonitor, TrainJob
from model.train.metrics import TrainingDiverged, read_metrics
from model.train.trainer import Scaling, run_job
from photos import PHOTOS, jpeg, photo

STEPS, CKPT_EVERY = 10, 2
LOSS_KEYS = ("total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy")


def tiny_ssl(**updates) -> SSLConfig:
    cfg = SSLConfig().with_updates(
        student={"arch": "vit_test", "patch_size": 14, "drop_path_rate": 0.1, "layerscale": None,
                 "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        crops={"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2},
        dino={"head_n_prototypes": 64, "head_hidden_dim": 64, "head_bottleneck_dim": 32},
        ibot={"head_n_prototypes": 64},
        train={"batch_size_per_gpu": 4, "official_epoch_length": 5, "centering": "centering"},
        optim={"epochs": STEPS // 5, "warmup_epochs": 1, "lr": 1e-3},
        compute={"autocast_dtype": "fp32"},
    )
    return cfg.with_updates(**updates) if updates else cfg


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[list[str], list[int], Path]:
    root = tmp_path_factory.mktemp("lvd")
    names = sorted(PHOTOS)
    files, rows = [], []
    for part, chunk in enumerate((names[:10], names[10:])):
        images = [jpeg(photo(n).resize((64, 64))) for n in chunk]
        path = root / f"part-{part:05d}.parquet"
        pq.write_table(pa.table({"image_id": chunk, "image": images}), path)
        files.append(str(path))
        rows.append(len(chunk))
    labelled = root / "labelled"  # solid colours: a probe any network separates
    from PIL import Image

    for split in ("train", "val"):
        for cls, rgb in {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 30, 210)}.items():
            (labelled / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 40), tuple(min(255, c + 10 * i) for c in rgb)).save(labelled / split / cls / f"{i}.png")
    return files, rows, labelled


def make_job(dataset, out: Path, **kw) -> TrainJob:
    files, rows, labelled = dataset
    knn = KnnMonitor(train_dir=str(labelled / "train"), val_dir=str(labelled / "val"), every=5, crop_size=28)
    base = dict(kind="pretrain", ssl=tiny_ssl().model_dump(mode="json"), files=files, rows=rows, out_dir=str(out),
                checkpoint_every=CKPT_EVERY, metrics_every=1, highres_fraction=0.2, highres_global_size=42,
                threads_per_worker=1, knn=knn)
    base.update(kw)
    return TrainJob(**base)


SCALING = Scaling(workers=2, cpus_per_worker=0.5, max_failures=2)


def final_tensors(job: TrainJob, tmp_path: Path, tag: str) -> dict[str, torch.Tensor]:
    """The final checkpoint's model state (teacher, student, centres) as full tensors."""
    ckpt = latest_checkpoint(job.checkpoint_dir)
    out = tmp_path / f"{tag}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)["model"]


@pytest.fixture(scope="module")
def uninterrupted(ray_session, dataset, tmp_path_factory):
    job = make_job(dataset, tmp_path_factory.mktemp("run-a"))
    outcome = run_job(job, SCALING, progress=False)
    return job, outcome


def test_two_workers_train_report_and_export(uninterrupted):
    job, outcome = uninterrupted
    steps = [r["step"] for r in outcome.metrics]
    assert steps == list(range(STEPS))
    assert all(all(torch.isfinite(torch.tensor(r[k])) for k in LOSS_KEYS) for r in outcome.metrics)
    # the high-resolution phase: the last 20 % of the steps at 42 px global crops, and it is in the saved state
    assert [r["global_crops_size"] for r in outcome.metrics] == [28] * 8 + [42] * 2
    state = read_state(latest_checkpoint(job.checkpoint_dir))
    assert state["step"] == STEPS and state["highres_start"] == 8 and state["crop_sizes"] == [42, 14]
    # online kNN measured at steps 4 and 9 on the solid-colour probe
    knn = [r for r in outcome.metrics if "knn_top1" in r]
    assert [r["step"] for r in knn] == [4, 9] and all(0.0 <= r["knn_top1"] <= 1.0 for r in knn)
    # schedules: warm-up then cosine lr; teacher temperature warm-up; momentum rises
    lr = [r["lr"] for r in outcome.metrics]
    assert lr[0] < lr[4] and lr[-1] < lr[5]
    assert outcome.metrics[0]["teacher_temp"] < outcome.metrics[-1]["teacher_temp"]
    # the export: official layout + timm + model.json with the step count
    meta = json.loads((job.export_dir / "model.json").read_text())
    assert meta["arch"] == "vit_test" and meta["embed_dim"] == 32 and meta["steps"] == STEPS
    assert {"backbone.pth", "heads.pth", "ssl_config.json", "model.json"} <= {p.name for p in job.export_dir.iterdir()}
    # checkpoints: only the newest `keep` (2) remain, complete
    assert sorted(p.name for p in job.checkpoint_dir.glob("step-*")) == ["step-0000008", "step-0000010"]


def test_killed_worker_resumes_exactly(uninterrupted, dataset, tmp_path):
    job_a, outcome_a = uninterrupted
    job = make_job(dataset, tmp_path / "run-b")
    box: dict = {}

    def run() -> None:
        try:
            box["outcome"] = run_job(job, SCALING, progress=False)
        except BaseException as err:  # noqa: BLE001 - reported by the assertion below
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    pid_file = Path(job.out_dir) / "workers" / "rank-1.pid"
    deadline = time.monotonic() + 240
    killed = None
    while time.monotonic() < deadline and thread.is_alive():
        ckpt = latest_checkpoint(job.checkpoint_dir) if job.checkpoint_dir.is_dir() else None
        if ckpt is not None and pid_file.is_file():
            killed = int(pid_file.read_text())
            os.kill(killed, signal.SIGKILL)  # a training worker dies mid-run
            killed_after = read_state(ckpt)["step"]
            break
        time.sleep(0.05)
    thread.join(timeout=300)
    assert "error" not in box, str(box.get("error"))[:6000]
    assert killed is not None and killed_after < STEPS, "the run finished before a worker could be killed"
    assert int(pid_file.read_text()) != killed, "Ray Train did not restart the worker group"

    # same steps, same loss terms and schedule values at every step as the uninterrupted run
    a = {r["step"]: r for r in outcome_a.metrics}
    b = {r["step"]: r for r in read_metrics(job.metrics_path)}
    assert sorted(b) == list(range(STEPS))
    for step in range(STEPS):
        for k in LOSS_KEYS:
            assert b[step][k] == a[step][k], (step, k, a[step][k], b[step][k])
    state_a, state_b = (read_state(latest_checkpoint(j.checkpoint_dir)) for j in (job_a, job))
    assert state_b["step"] == state_a["step"] == STEPS
    assert state_b["schedule_values"] == state_a["schedule_values"]
    # the DINO centre, the teacher and the student are bit-identical
    ta, tb = final_tensors(job_a, tmp_path, "a"), final_tensors(job, tmp_path, "b")
    assert set(ta) == set(tb)
    assert {"dino_loss.centering.center", "ibot_patch_loss.centering.center"} <= set(ta)
    assert ta["dino_loss.centering.center"].abs().sum() > 0  # the centre did move
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key


def test_nan_loss_stops_with_the_step_and_terms(ray_session, dataset, tmp_path):
    bad = tiny_ssl(dino={"student_temp": 0.0})  # logits / 0 → inf → NaN cross-entropy at the first step
    job = make_job(dataset, tmp_path / "run-nan", ssl=bad.model_dump(mode="json"), knn=None, checkpoint_every=100)
    with pytest.raises(TrainingDiverged, match=r"training diverged at step 0: non-finite loss \(dino.*terms: .*dino=nan"):
        run_job(job, SCALING, progress=False)
    assert job.diverged_path.is_file()
