"""model.train.metrics: divergence check, metrics.jsonl reading/truncation/writing, summaries, worker means."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from distributed import run_distributed
from model.train.metrics import (
    MetricsWriter,
    TrainingDiverged,
    check_finite,
    mean_over_workers,
    read_metrics,
    summarise,
    truncate_metrics,
)


def write_lines(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


# ------------------------------------------------------------------ check_finite
def test_check_finite_passes_finite_terms() -> None:
    check_finite(3, {"total": 1.5, "dino": 1.0, "ibot": 0.0, "koleo": -0.2})
    check_finite(0, {})


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_finite_names_step_and_every_term(bad: float) -> None:
    with pytest.raises(TrainingDiverged) as err:
        check_finite(17, {"total": bad, "dino": 1.25, "ibot": bad, "koleo": -0.5})
    msg = str(err.value)
    assert "step 17" in msg
    assert "(ibot, total)" in msg  # the non-finite terms
    for term in ("dino=1.25", f"ibot={bad}", "koleo=-0.5", f"total={bad}"):  # and every term's value
        assert term in msg
    assert isinstance(err.value, RuntimeError)


# ------------------------------------------------------------------ metrics.jsonl
def test_read_metrics_ignores_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    write_lines(path, [{"step": 0, "total": 2.0}, {"step": 1, "total": 1.5}], tail='{"step": 2, "tot')
    assert read_metrics(path) == [{"step": 0, "total": 2.0}, {"step": 1, "total": 1.5}]
    path.write_text("")
    assert read_metrics(path) == []


def test_truncate_metrics_keeps_earlier_steps_atomically(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "total": 10.0 - s} for s in range(6)]
    write_lines(path, records, tail='{"step": 6')
    with open(path) as old:  # a reader of the old file is unaffected: the new file replaces it
        kept = truncate_metrics(path, 3)
        assert old.read().count("\n") == 6
    assert kept == records[:3]
    assert read_metrics(path) == records[:3]
    assert path.read_text().endswith("\n") and path.read_text().count("\n") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temporary file left
    assert truncate_metrics(path, 0) == [] and path.read_text() == ""


def test_truncate_metrics_creates_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "metrics.jsonl"
    assert truncate_metrics(path, 5) == []
    assert path.is_file() and path.read_text() == ""


def test_metrics_writer_only_writes_when_enabled(tmp_path: Path) -> None:
    off = MetricsWriter(tmp_path / "other.jsonl", enabled=False)
    off.write({"step": 0})
    off.close()
    assert not (tmp_path / "other.jsonl").exists()

    path = tmp_path / "metrics.jsonl"
    write_lines(path, [{"step": 0, "total": 3.0}])  # a resumed run appends
    w = MetricsWriter(path, enabled=True)
    w.write({"total": 2.0, "step": 1})
    assert read_metrics(path) == [{"step": 0, "total": 3.0}, {"step": 1, "total": 2.0}]  # flushed, readable now
    w.write({"step": 2, "total": 1.0})
    w.close()
    w.close()
    w.write({"step": 3})  # after close: ignored
    assert [r["step"] for r in read_metrics(path)] == [0, 1, 2]
    assert path.read_text().splitlines()[1] == '{"step": 1, "total": 2.0}'  # keys sorted


# ------------------------------------------------------------------ summaries
def test_summarise() -> None:
    assert summarise([]) == {}
    records = [
        {"step": 9, "total": 5.0, "images_per_s": 10.0, "teacher_entropy": 3.0},
        {"step": 19, "total": 4.0, "images_per_s": 30.0, "knn_top1": 0.2},
        {"step": 24, "total": 3.5, "knn_top1": 0.6},
        {"step": 29, "total": 3.0, "images_per_s": 20.0, "knn_top1": 0.4, "teacher_entropy": 1.5},
    ]
    assert summarise(iter(records)) == {
        "steps": 30, "first_loss": 5.0, "last_loss": 3.0, "images_per_s": 20.0, "last_teacher_entropy": 1.5,
        "knn_first": 0.2, "knn_last": 0.4, "knn_best": 0.6,
    }
    no_knn = summarise([{"step": 0, "total": 1.0}])
    assert no_knn == {"steps": 1, "first_loss": 1.0, "last_loss": 1.0, "images_per_s": None,
                      "last_teacher_entropy": None}


# ------------------------------------------------------------------ mean over workers
def test_mean_over_workers_without_process_group_is_identity() -> None:
    values = {"total": 1.5, "dino": 2}
    out = mean_over_workers(values)
    assert out == values and out is not values
    assert mean_over_workers({}) == {}


def _worker_means(rank: int, world_size: int) -> list[dict]:
    return [mean_over_workers({"total": [1.0, 3.0][rank], "dino": [10.0, -10.0][rank], "lr": 0.5}),
            mean_over_workers({"total": [1.0, math.nan][rank]}), mean_over_workers({})]


def test_mean_over_workers_on_two_processes(tmp_path: Path) -> None:
    r0, r1 = run_distributed(_worker_means, tmp_path)
    for means, with_nan, empty in (r0, r1):
        assert means == {"total": 2.0, "dino": 0.0, "lr": 0.5}
        assert math.isnan(with_nan["total"])  # one diverged worker stops every worker
        assert empty == {}
