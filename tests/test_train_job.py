"""model.train.job.TrainJob: step counts, the high-resolution phase, validation, JSON round trip."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from model.train.job import DataSettings, KnnMonitor, TrainJob
from test_meta_arch import G, L, P, tiny_cfg


def make_job(tmp_path: Path, epochs: int = 4, epoch_length: int = 2, **fields) -> TrainJob:
    ssl = tiny_cfg(optim={"epochs": epochs}, train={"official_epoch_length": epoch_length}).model_dump(mode="json")
    base = dict(kind="pretrain", ssl=ssl, files=["a.parquet", "b.parquet"], rows=[3, 5], out_dir=str(tmp_path))
    return TrainJob(**{**base, **fields})


def test_total_steps_and_paths(tmp_path: Path) -> None:
    job = make_job(tmp_path, epochs=4, epoch_length=2)
    assert job.total_steps == 8
    assert make_job(tmp_path, epochs=3, epoch_length=10).total_steps == 30
    assert job.checkpoint_dir == tmp_path / "checkpoints"
    assert job.metrics_path == tmp_path / "metrics.jsonl"
    assert job.export_dir == tmp_path / "export"
    assert job.diverged_path == tmp_path / "diverged.json"


def test_no_highres_phase(tmp_path: Path) -> None:
    job = make_job(tmp_path)
    assert job.highres_start is None
    assert [job.crop_sizes(s) for s in (0, 7)] == [(G, L), (G, L)]


def test_highres_phase_boundary(tmp_path: Path) -> None:
    job = make_job(tmp_path, highres_fraction=0.25, highres_global_size=42)  # last 2 of 8 steps
    assert job.highres_start == 6
    assert job.crop_sizes(5) == (G, L)
    assert job.crop_sizes(6) == (42, L)  # local crops keep their size unless highres_local_size is set
    assert job.crop_sizes(7) == (42, L)
    job = replace(job, highres_local_size=21)
    assert job.crop_sizes(5) == (G, L) and job.crop_sizes(6) == (42, 21)


def test_highres_phase_length(tmp_path: Path) -> None:
    # a tiny fraction still gives one high-resolution step; a partial step rounds up
    assert make_job(tmp_path, highres_fraction=0.01).highres_start == 7
    assert make_job(tmp_path, highres_fraction=0.3).highres_start == 8 - 3  # 2.4 steps → 3
    # the paper's 10k of 625k iterations
    assert make_job(tmp_path, epochs=500, epoch_length=1250, highres_fraction=10_000 / 625_000).highres_start == 615_000


def test_highres_phase_length_is_not_off_by_float_rounding(tmp_path: Path) -> None:
    # 7 % of 100 steps is 7 steps; 0.07 * 100 == 7.000000000000001 in floating point
    assert make_job(tmp_path, epochs=4, epoch_length=25, highres_fraction=0.07).highres_start == 93
    assert make_job(tmp_path, epochs=4, epoch_length=25, highres_fraction=0.28).highres_start == 72


def test_validate_accepts_a_good_job(tmp_path: Path) -> None:
    make_job(tmp_path).validate()
    make_job(tmp_path, highres_fraction=0.25, highres_global_size=42).validate()
    make_job(tmp_path, highres_global_size=30).validate()  # no high-resolution phase: the size is unused
    make_job(tmp_path, kind="distill", teacher_dir=str(tmp_path / "teacher")).validate()


@pytest.mark.parametrize(("fields", "message"), [
    ({"files": [], "rows": []}, "dataset is empty"),
    ({"rows": [0, 0]}, "dataset is empty"),
    ({"rows": [3]}, "files and rows differ"),
    ({"files": ["a.parquet"]}, "files and rows differ"),
    ({"kind": "distill"}, "distillation needs teacher_dir"),
    ({"highres_fraction": 0.25, "highres_global_size": 30}, "30 is not a multiple of the patch size 7"),
    ({"highres_fraction": 1.0}, r"highres_fraction must be in \[0, 1\)"),
    ({"highres_fraction": -0.1}, r"highres_fraction must be in \[0, 1\)"),
])
def test_validate_errors(tmp_path: Path, fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_job(tmp_path, **fields).validate()


def test_json_round_trip(tmp_path: Path) -> None:
    job = make_job(
        tmp_path, kind="distill", teacher_dir="/x/export", highres_fraction=0.25, highres_global_size=42,
        highres_local_size=21, precision="fp32", fsdp=False, threads_per_worker=1,
        data=DataSettings(num_cpus=1.0, concurrency=2, prefetch=3),
        knn=KnnMonitor(train_dir="/k/train", val_dir="/k/val", every=5, k=3, crop_size=P * 4, max_images=10),
        export_extra={"dataset_fingerprint": "abc123"},
    )
    text = job.to_json()
    back = TrainJob.from_dict(json.loads(text))
    assert back == job
    assert isinstance(back.data, DataSettings) and isinstance(back.knn, KnnMonitor)
    assert back.to_json() == text
    assert back.ssl_config == job.ssl_config and back.crop_sizes(6) == (42, 21)

    plain = make_job(tmp_path)
    assert TrainJob.from_dict(json.loads(plain.to_json())) == plain
    minimal = {k: v for k, v in json.loads(plain.to_json()).items() if k not in ("data", "knn")}
    assert TrainJob.from_dict(minimal) == plain  # omitted sections take their defaults
