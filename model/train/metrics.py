"""Training metrics: averaged over workers, checked for NaN/inf, appended to ``metrics.jsonl``.

Worker 0 appends one JSON line per logged step (flushed, so a driver can tail the file for a
progress bar). On resume the lines past the checkpoint's step are dropped first, so the file
always describes one uninterrupted run.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import torch
import torch.distributed as dist


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or infinite; names the step and the terms."""


def mean_over_workers(values: dict[str, float]) -> dict[str, float]:
    """The mean of each value over all workers (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def check_finite(step: int, losses: dict[str, float]) -> None:
    """Raise ``TrainingDiverged`` naming the step and every term when any term is not finite."""
    bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
    if bad:
        terms = ", ".join(f"{k}={v}" for k, v in sorted(losses.items()))
        raise TrainingDiverged(f"training diverged at step {step}: non-finite loss ({', '.join(sorted(bad))}); "
                               f"terms: {terms}. Lower the learning rate (optim.lr / base_lr), raise the "
                               f"warm-up, or check the data; the last checkpoint before it is kept.")


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line is ignored)."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def truncate_metrics(path: str | Path, before_step: int) -> list[dict[str, Any]]:
    """Keep only the records of steps < ``before_step`` (atomic rewrite); returns them."""
    path = Path(path)
    keep = [r for r in read_metrics(path) if r.get("step", -1) < before_step]
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    os.replace(tmp, path)
    return keep


class MetricsWriter:
    """Appends records to ``metrics.jsonl`` (worker 0 only; other workers get a no-op writer)."""

    def __init__(self, path: str | Path, enabled: bool) -> None:
        self.path = Path(path)
        self.enabled = enabled
        self._fh = open(self.path, "a", buffering=1) if enabled else None

    def write(self, record: dict[str, Any]) -> None:
        if self._fh is not None:
            self._fh.write(json.dumps(record, sort_keys=True) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def summarise(records: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """First/last loss, best kNN, mean images/s of a run (for artifacts and the CLI)."""
    records = list(records)
    if not records:
        return {}
    first, last = records[0], records[-1]
    knn = [r for r in records if "knn_top1" in r]
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    out = {"steps": int(last["step"]) + 1, "first_loss": first.get("total"), "last_loss": last.get("total"),
           "images_per_s": sum(speeds) / len(speeds) if speeds else None,
           "last_teacher_entropy": last.get("teacher_entropy")}
    if knn:
        out["knn_first"] = knn[0]["knn_top1"]
        out["knn_last"] = knn[-1]["knn_top1"]
        out["knn_best"] = max(r["knn_top1"] for r in knn)
    return out
