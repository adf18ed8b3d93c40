"""Driver side of a training run: Ray Train ``TorchTrainer`` over N workers, a progress bar, the outcome.

gloo on CPU, nccl on GPU; ``FailureConfig(max_failures)`` restarts the worker group when a worker
dies, and the workers resume from the latest checkpoint in ``job.checkpoint_dir`` (so
``out_dir`` must be storage every node sees). The driver tails worker 0's ``metrics.jsonl`` for a
progress bar with the loss, and returns the export paths and the metrics history. A run whose
loss became NaN/inf fails at once (``TrainingDiverged``) with the step and the loss terms: the
workers stop at that step and end normally, so Ray Train does not restart a group that would only
diverge again.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from model.train.job import TrainJob
from model.train.metrics import TrainingDiverged, read_metrics, summarise

log = logging.getLogger("lvd.train")


@dataclass(frozen=True)
class Scaling:
    """How many Ray Train workers and what each one gets."""

    workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2


@dataclass
class TrainOutcome:
    export: dict[str, Any]
    metrics: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


class _Progress(threading.Thread):
    """Follows ``metrics.jsonl`` and moves a tqdm bar (steps done, last loss, images/s, kNN)."""

    def __init__(self, path: Path, total: int, desc: str, enabled: bool) -> None:
        super().__init__(daemon=True)
        self.path, self.total, self.desc, self.enabled = path, total, desc, enabled
        self.stop = threading.Event()

    def run(self) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        bar = tqdm(total=self.total, desc=self.desc, unit="step", dynamic_ncols=True)
        seen = 0
        while not self.stop.wait(1.0):
            seen = self._update(bar, seen)
        self._update(bar, seen)
        bar.close()

    def _update(self, bar: Any, seen: int) -> int:
        records = read_metrics(self.path)
        if not records:
            return seen
        last = records[-1]
        done = int(last["step"]) + 1
        bar.n = done
        post = {"loss": f"{last.get('total', float('nan')):.3f}"}
        if last.get("images_per_s"):
            post["img/s"] = f"{last['images_per_s']:.1f}"
        knn = [r for r in records if "knn_top1" in r]
        if knn:
            post["knn"] = f"{knn[-1]['knn_top1']:.3f}"
        bar.set_postfix(post, refresh=False)
        bar.refresh()
        return done


def _trainer_class() -> type:
    """``TorchTrainer`` whose run ends without Ray's 12-second wait on its placement-group cleaner.

    Ray Train 2.x stops that detached helper with ``ray.get(stop.remote(), timeout=12)``, but
    ``stop`` exits the actor without returning, so every run waited the full 12 s before ``fit``
    returned (measured on 2.60: "Failed to stop PlacementGroupCleaner gracefully", GetTimeoutError).
    Here the stop request is sent and not waited on; the helper still exits. Falls back to the
    stock trainer where Ray's internals differ."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return TorchTrainer
    if not hasattr(PlacementGroupCleanerCallback, "_stop_cleaner") or \
            not hasattr(TorchTrainer, "_create_default_callbacks"):
        return TorchTrainer

    class NoWaitCleaner(PlacementGroupCleanerCallback):
        def _stop_cleaner(self) -> None:
            cleaner, self._cleaner = self._cleaner, None
            if cleaner is not None:
                cleaner.stop.remote()  # the actor exits on it: there is no reply to wait for

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            return [NoWaitCleaner() if type(cb) is PlacementGroupCleanerCallback else cb
                    for cb in super()._create_default_callbacks()]

    return Trainer


def run_job(job: TrainJob, scaling: Scaling, *, name: str = "train", progress: bool = True) -> TrainOutcome:
    """Run ``job`` on Ray Train (Ray must be initialised); returns the export and the metrics."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from model.train.worker import train_loop_per_worker

    job.validate()
    out = Path(job.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    job.diverged_path.unlink(missing_ok=True)
    (out / "result.json").unlink(missing_ok=True)
    (out / "job.json").write_text(job.to_json())
    trainer = _trainer_class()(
        train_loop_per_worker,
        train_loop_config={"job": asdict(job), "use_gpu": scaling.use_gpu},
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=scaling.max_failures)),
    )
    bar = _Progress(job.metrics_path, job.total_steps, f"{job.kind} ({scaling.workers} workers)", progress)
    bar.start()
    try:
        trainer.fit()
    except Exception as err:
        if job.diverged_path.is_file():
            raise TrainingDiverged(json.loads(job.diverged_path.read_text())["message"]) from None
        raise RuntimeError(f"{job.kind} failed: {err}. Checkpoints are kept in {job.checkpoint_dir}; rerunning "
                           f"the stage resumes from the latest one.") from err
    finally:
        bar.stop.set()
        bar.join(timeout=5)
    if job.diverged_path.is_file():  # the workers stopped at the non-finite step (no restart)
        raise TrainingDiverged(json.loads(job.diverged_path.read_text())["message"])
    result_path = out / "result.json"
    if not result_path.is_file():
        raise RuntimeError(f"{job.kind} finished without writing {result_path}; see the Ray logs")
    metrics = read_metrics(job.metrics_path)
    return TrainOutcome(json.loads(result_path.read_text()), metrics, summarise(metrics))
