"""The loop each Ray Train worker runs (``train_loop_per_worker``), for pretraining and distillation.

setup (device, threads) → model (``SSLMetaArch`` or ``DistillMetaArch``) → FSDP2 sharding →
optimizer → resume from the latest checkpoint (model, optimizer, DINO/iBOT centres, schedules,
step) → stream this worker's batches from the dataset via Ray Data from that step → per step:
seed, schedules, forward/backward, gradient sync (unsharded multi-worker runs only), last-layer
freeze, clipping, optimizer step, EMA → metrics (averaged over workers, NaN/inf stops the run)
→ checkpoint every ``checkpoint_every`` steps → online kNN every ``knn.every`` steps → at the
end a last checkpoint and the export of the final backbone (worker 0).

Exact resume: the data of step ``t`` is a function of (seed, rank, t) (``model.data.stream``),
the random state of step ``t`` is seeded from (seed, rank, t), and the schedules are a function
of (config, world size, t); so a run killed and resumed from a checkpoint at step ``c`` computes
the same steps ``c, c+1, …`` as an uninterrupted run.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from model.ssl.config import SSLConfig
from model.ssl.meta_arch import SSLMetaArch
from model.ssl.schedules import Schedules, apply_optim_scheduler
from model.train import checkpoint as ckpt
from model.train.fsdp import device_mesh, mixed_precision_policy, shard_student_teacher
from model.train.job import TrainJob
from model.train.metrics import MetricsWriter, TrainingDiverged, check_finite, mean_over_workers, truncate_metrics

log = logging.getLogger("lvd.train")

# our backbones return dicts of slices of their output; nothing modifies them in place
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")


def step_seed(seed: int, rank: int, step: int) -> int:
    """A 63-bit seed for the random state of one step of one worker."""
    h = hashlib.blake2b(f"train:{seed}:{rank}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_model(job: TrainJob) -> SSLMetaArch:
    """The meta-architecture of the job, unsharded, on the CPU (same weights on every worker)."""
    cfg = job.ssl_config
    torch.manual_seed(cfg.train.seed)  # identical initialisation on every worker
    if job.kind == "pretrain":
        return SSLMetaArch(cfg)
    from model.ssl.distill_arch import DistillMetaArch, teacher_modules
    from model.train.teacher import load_teacher

    backbone, heads, teacher_cfg = load_teacher(job.teacher_dir)
    return DistillMetaArch(cfg, teacher_modules(teacher_cfg, backbone, heads))


def shard(model: SSLMetaArch, job: TrainJob, device: torch.device, world_size: int) -> None:
    """FSDP2 over every module group that is trained or follows the student by EMA."""
    extra = [model.student_ema] if hasattr(model, "student_ema") else []
    shard_student_teacher(model.student, model.teacher, device_mesh(world_size, device.type),
                          mixed_precision_policy(job.precision, device.type), extra=extra)


def sync_gradients(model: SSLMetaArch) -> None:
    """Unsharded multi-worker runs: average the student's gradients over the workers (DDP's job)."""
    _, ws = world()
    if ws == 1:
        return
    grads = [p.grad for p in model.student.parameters() if p.grad is not None]
    for g in grads:
        dist.all_reduce(g)
        g.div_(ws)


class Trainer:
    """One worker's training state and loop (see the module docstring)."""

    def __init__(self, job: TrainJob, device: torch.device) -> None:
        self.job = job
        self.cfg: SSLConfig = job.ssl_config
        self.device = device
        self.rank, self.world_size = world()
        self.model = build_model(job)
        self.model.to(device)
        self.sharded = job.fsdp
        if self.sharded:
            shard(self.model, job, device, self.world_size)
        self.model.train()
        self.optimizer = self.model.make_optimizer()
        self.schedules = Schedules.from_config(self.cfg, world_size=self.world_size)
        self.total_steps = job.total_steps
        self.start_step = 0
        self.knn = None

    # ------------------------------------------------------------ state
    def state(self, step: int) -> dict[str, Any]:
        return {"schedules": self.schedules.state_dict(), "world_size": self.world_size, "total_steps": self.total_steps,
                "highres_start": self.job.highres_start, "crop_sizes": list(self.job.crop_sizes(step)),
                "data_position": {"seed": self.cfg.train.seed, "next_step": step},
                "schedule_values": self.schedules.at(max(step - 1, 0)).to_dict(), "kind": self.job.kind}

    def resume(self) -> int:
        """Load the newest complete checkpoint, if any; returns the step to continue from."""
        root = self.job.checkpoint_dir
        ckpt.clean_partial(root)
        latest = ckpt.latest_checkpoint(root)
        if latest is None:
            if self.rank == 0:
                truncate_metrics(self.job.metrics_path, 0)
            return 0
        state = ckpt.load_checkpoint(latest, self.model, [self.optimizer])
        self.schedules = Schedules.from_state_dict(state["schedules"])  # the saved schedule, not a recomputed one
        if state["total_steps"] != self.total_steps:
            raise ValueError(f"checkpoint {latest} is of a {state['total_steps']}-step run; this job has "
                             f"{self.total_steps} steps (a changed config gets a new output folder)")
        if self.rank == 0:
            truncate_metrics(self.job.metrics_path, state["step"])
            log.info("resuming from %s (step %d)", latest, state["step"])
        return int(state["step"])

    def save(self, step: int) -> None:
        ckpt.save_checkpoint(self.job.checkpoint_dir, step, self.model, [self.optimizer], self.state(step),
                             keep=self.job.keep_checkpoints)

    # ------------------------------------------------------------ data
    def batches(self, start: int) -> Iterator[dict[str, Any]]:
        from model.data.stream import stream_batches

        d = self.job.data
        return stream_batches(
            self.job.files, self.job.rows, self.cfg, rank=self.rank, world_size=self.world_size,
            batch_size=self.cfg.train.batch_size_per_gpu, seed=self.cfg.train.seed, start_step=start,
            num_steps=self.total_steps - start, crops_for_step=self.job.crop_sizes,
            num_cpus=d.num_cpus, concurrency=d.concurrency, prefetch=d.prefetch,
        )

    # ------------------------------------------------------------ one step
    def step(self, it: int, batch: dict[str, Any]) -> dict[str, float]:
        m, values = self.model, self.schedules.at(it)
        seed_everything(step_seed(self.cfg.train.seed, self.rank, it))
        apply_optim_scheduler(self.optimizer, values)
        self.optimizer.zero_grad(set_to_none=True)
        losses = m.forward_backward(batch, teacher_temp=values.teacher_temp)
        if not self.sharded:
            sync_gradients(m)
        m.cancel_last_layer_gradients(it)
        if self.cfg.optim.clip_grad:
            m.clip_gradients(self.cfg.optim.clip_grad)
        self.optimizer.step()
        m.update_teacher(values.momentum)
        return {**losses, **{k: v for k, v in m.last_stats.items() if k != "log_k"}, "lr": values.lr, "wd": values.wd,
                "momentum": values.momentum, "teacher_temp": values.teacher_temp}

    # ------------------------------------------------------------ loop
    def run(self, report: Any = None) -> dict[str, Any]:
        job = self.job
        if job.diverged_path.is_file():  # a restart after divergence would only diverge again
            return {}
        start = self.resume()
        if job.knn is not None and job.knn.every > 0:
            from model.eval.features import make_eval_transform
            from model.train.monitor import OnlineKnn

            self.knn = OnlineKnn(job.knn, make_eval_transform(job.knn.crop_size))
        writer = MetricsWriter(job.metrics_path, enabled=self.rank == 0)
        last = self.total_steps - 1
        global_batch = self.cfg.train.batch_size_per_gpu * self.world_size
        window_t0, window_n = time.perf_counter(), 0
        try:
            for batch in self.batches(start):
                it = int(batch["step"])
                record = mean_over_workers(self.step(it, batch))
                try:
                    check_finite(it, {k: record[k] for k in ("total", *self.model.loss_terms.names) if k in record})
                except TrainingDiverged as err:
                    # every rank sees the same (averaged) loss: all stop here and end normally, so Ray Train
                    # does not restart a worker group that would only diverge again; the driver raises
                    if self.rank == 0:
                        ckpt._write_text_atomic(job.diverged_path, json.dumps({"step": it, "message": str(err)}))
                    log.error("%s", err)
                    return {}
                window_n += 1
                done = it + 1
                if self.knn is not None and self.knn.due(it, last):
                    record["knn_top1"] = self.knn.measure(self.teacher_backbone(), self.model.autocast)
                if done % job.metrics_every == 0 or it == last or "knn_top1" in record:
                    elapsed = time.perf_counter() - window_t0
                    record.update(step=it, images_per_s=global_batch * window_n / elapsed if elapsed > 0 else None,
                                  global_crops_size=self.job.crop_sizes(it)[0])
                    writer.write(record)
                    if report is not None:
                        report(record)
                    window_t0, window_n = time.perf_counter(), 0
                if done % job.checkpoint_every == 0 or it == last:
                    self.save(done)
        finally:
            writer.close()
        return self.export()

    # ------------------------------------------------------------ result
    def teacher_backbone(self) -> nn.Module:
        """The network whose features are the result: the EMA teacher, or the student's EMA when distilling."""
        return self.model.student_ema["backbone"] if hasattr(self.model, "student_ema") else self.model.teacher["backbone"]

    def result_modules(self) -> nn.ModuleDict:
        return self.model.student_ema if hasattr(self.model, "student_ema") else self.model.teacher

    def export(self) -> dict[str, Any]:
        """Full (unsharded) state of the result modules → worker 0 writes backbone, timm file, heads, model.json."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from model.train.teacher import export_result

        mods = self.result_modules()
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        full = {name: get_model_state_dict(mods[name], options=opts) if self.sharded else
                {k: v.detach().cpu() for k, v in mods[name].state_dict().items()} for name in mods.keys()}
        if self.rank != 0:
            return {}
        return export_result(self.job, full)


def device_for_worker(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        from ray.train.torch import get_device

        return get_device()
    return torch.device("cpu")


def return_freed_memory() -> None:
    """glibc: serve allocations >= 1 MiB with mmap, so buffers FSDP frees every step go back to the OS.

    With the default (dynamic) threshold glibc keeps them in the heap and a sharded worker's resident
    memory barely drops below an unsharded one's (benchmarks/train_scaling.py measured both).
    """
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except OSError:  # not glibc (e.g. musl): nothing to tune
            pass


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: ``config = {"job": TrainJob as dict, "use_gpu": bool}``."""
    import ray.train

    return_freed_memory()

    import ray.data

    logging.basicConfig(level=logging.INFO)
    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver shows one bar for the run
    job = TrainJob.from_dict(config["job"])
    if job.threads_per_worker:
        torch.set_num_threads(job.threads_per_worker)
    ctx = ray.train.get_context()
    pid_dir = Path(job.out_dir, "workers")  # which process is which rank (for operators, and the kill tests)
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"rank-{ctx.get_world_rank()}.pid").write_text(f"{os.getpid()}\n")
    trainer = Trainer(job, device_for_worker(config.get("use_gpu", False)))

    def report(record: dict[str, Any]) -> None:
        ray.train.report({k: v for k, v in record.items() if v is not None})

    result = trainer.run(report=report)
    if ctx.get_world_rank() == 0 and result:
        Path(job.out_dir, "result.json").write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
