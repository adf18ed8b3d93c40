"""Ray Train pretraining with 1 and 2 workers: images/s, and per-worker memory with FSDP2 sharding vs unsharded replicas.

    .venv/bin/python benchmarks/train_scaling.py [--steps 12] [--warmup 4] [--batch 8] [--arch vit_small]
        [--prototypes 131072] [--runs 1w,2w-fsdp,2w-replicas[,2w-fsdp@glibc,2w-replicas@glibc]] [--keep]

Runs of the real training path (``model.train.trainer.run_job``: Ray Train ``TorchTrainer``, gloo,
the Ray Data input pipeline streaming from Parquet shards of JPEGs, a DCP checkpoint and the export at
the end), one after the other, each on a fresh local Ray (``address="local"``, even when other Ray
instances run on the machine):

- ``1w``           1 worker (``fsdp=True``: FSDP2 over a 1-rank mesh, i.e. nothing is sharded) — the anchor;
- ``2w-fsdp``      2 workers, FSDP2 ``fully_shard`` (each worker holds half of every parameter, gradient
                   and AdamW moment);
- ``2w-replicas``  2 workers, ``fsdp=False``: full replicas, gradients all-reduced (DDP-style).

Every worker gets ``nproc // workers`` torch threads, so each configuration uses the whole machine
(on a 2-core machine 2 workers cannot beat 1: the point of the 2-worker runs is the memory).

Model: DINOv2 at ViT-S/14 with the official ViT-g/14 heads (131,072 prototypes, hidden 2048,
bottleneck 256, a separate iBOT head): 21.5 M backbone + 2 heads of ~39 M = 99.7 M trainable
student parameters, so parameters, gradients and AdamW moments dominate memory, while the crops are
tiny (2 global 56 px + 2 local 28 px, batch 8 per worker) so compute stays cheap. The last layer
is not frozen (``freeze_last_layer_epochs: 0``: it has gradients and AdamW state from step 0); fp32
throughout (no autocast), so the byte counts are exact.

Allocator: the Ray workers run with ``MALLOC_MMAP_THRESHOLD_=1048576`` (``--mmap-threshold``), so
every tensor above 1 MiB is its own mapping and goes back to the OS when freed: RSS then follows
what the process holds. With glibc's default (a dynamic threshold that rises to 32 MiB after the
first large free) FSDP2's per-step buffers — all-gathered parameters, unsharded gradients,
reduce-scatter inputs, allocated and freed for every FSDP unit every step — stay in the heap and
hide most of the saving; the ``@glibc`` runs (e.g. ``--runs 2w-fsdp@glibc,2w-replicas@glibc``)
measure that setting.

Figures:

- **images/s**: from the workers' own metrics (``metrics_every=1``: one record per step, global
  batch ÷ step time, data waits included), over the steps after the first ``--warmup`` ones
  (total images ÷ total time).
- **peak RSS**: per worker, the largest VmRSS of its process (pid from
  ``<out_dir>/workers/rank-<r>.pid``), sampled from ``/proc`` every 50 ms by a driver thread, from
  the process's start until the last step's metrics record appears (model build, sharding, every
  training step; not the final checkpoint and export). Max over the workers.
- **RSS between steps**: per worker, the lowest VmRSS while each step 1.. runs (the floor the
  step's transient buffers sit on: what stays resident), median over the steps, max over the workers.
- **VmHWM**: the kernel's peak RSS of the worker process, last value read before it exits (includes
  the final DCP checkpoint and the export, where worker 0 gathers the full teacher).
- **state MiB (theory)**: per worker, fp32 bytes of student params + grads + 2 AdamW moments +
  teacher params; element counts from ``model.train.fsdp.local_numel`` after the library's own
  ``build_model`` + ``shard()`` on a fake 2-rank process group (rank 0, the larger shard), in a
  subprocess.

Ratios: throughput 2w/1w; per-worker memory FSDP/replicas (peak, between steps, theory); the
measured saving replicas − FSDP against the theoretical one. Prints the table and writes
``benchmarks/results/train_scaling.json`` (``--out`` elsewhere).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MIB = 1024 * 1024
MMAP_THRESHOLD = 1 << 20  # MALLOC_MMAP_THRESHOLD_ of the Ray workers (see the module docstring)
PHOTOS = {  # files shipped inside installed packages (never downloaded)
    "skimage": ("data", ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                         "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png", "coins.png", "moon.png",
                         "grass.png", "gravel.png", "brick.png", "cell.png", "horse.png", "page.png")),
    "sklearn": ("datasets/images", ("china.jpg", "flower.jpg")),
}


@dataclass(frozen=True)
class RunSpec:
    name: str
    workers: int
    fsdp: bool
    label: str
    glibc_malloc: bool = False  # True: leave glibc's dynamic mmap threshold alone in the workers


RUNS = {
    "1w": RunSpec("1w", 1, True, "1 worker"),
    "2w-fsdp": RunSpec("2w-fsdp", 2, True, "2 workers, FSDP2"),
    "2w-replicas": RunSpec("2w-replicas", 2, False, "2 workers, unsharded"),
}
GLIBC_SUFFIX = "@glibc"


def run_spec(name: str) -> RunSpec:
    """``1w``, ``2w-fsdp``, ``2w-replicas``, each optionally suffixed ``@glibc``."""
    base = name.removesuffix(GLIBC_SUFFIX)
    if base not in RUNS:
        raise SystemExit(f"unknown run {name!r}: expected one of {', '.join(RUNS)}, optionally + {GLIBC_SUFFIX}")
    spec = RUNS[base]
    if name == base:
        return spec
    return RunSpec(name, spec.workers, spec.fsdp, spec.label + ", glibc", glibc_malloc=True)


# ----------------------------------------------------------------------------- data
def source_photos() -> list[Path]:
    import importlib.util

    out = []
    for package, (sub, names) in PHOTOS.items():
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            continue
        base = Path(next(iter(spec.submodule_search_locations))) / sub
        out += [base / n for n in names if (base / n).is_file()]
    if not out:
        raise SystemExit("no source photos found in scikit-image / scikit-learn")
    return out


def make_dataset(folder: Path, n_images: int, n_shards: int, seed: int = 0) -> tuple[list[str], list[int], dict]:
    """``n_images`` JPEGs (random crops of real photos, long side 160-384 px, flips, colour shifts) in Parquet shards."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image, ImageEnhance, ImageOps

    photos = source_photos()
    sources = []
    for p in photos:
        with Image.open(p) as im:
            sources.append(im.convert("RGB"))
    rng = np.random.default_rng(seed)
    images, ids = [], []
    for i in range(n_images):
        src = sources[int(rng.integers(len(sources)))]
        w0, h0 = src.size
        cw, ch = int(w0 * rng.uniform(0.4, 1.0)), int(h0 * rng.uniform(0.4, 1.0))
        x0, y0 = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
        img = src.crop((x0, y0, x0 + cw, y0 + ch))
        scale = float(rng.uniform(160, 384)) / max(cw, ch)
        img = img.resize((max(32, round(cw * scale)), max(32, round(ch * scale))), Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            img = ImageOps.mirror(img)
        img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.6, 1.4)))
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.8, 1.2)))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(75, 95)))
        images.append(buf.getvalue())
        ids.append(f"{i:06d}")
    files, rows = [], []
    per = math.ceil(n_images / n_shards)
    for s in range(n_shards):
        chunk = slice(s * per, min(n_images, (s + 1) * per))
        if chunk.start >= chunk.stop:
            break
        path = folder / f"part-{s:05d}.parquet"
        pq.write_table(pa.table({"image_id": ids[chunk], "image": images[chunk]}), path)
        files.append(str(path))
        rows.append(chunk.stop - chunk.start)
    sizes = np.array([len(b) for b in images]) / 1024
    return files, rows, {"images": n_images, "shards": len(files), "photos": len(photos),
                         "kib_median": round(float(np.median(sizes)), 1), "mib_total": round(float(sizes.sum()) / 1024, 1)}


# ----------------------------------------------------------------------------- job
def ssl_json(args) -> dict:
    from model.ssl.config import SSLConfig

    cfg = SSLConfig().with_updates(
        student={"arch": args.arch, "patch_size": args.patch, "drop_path_rate": 0.1},
        crops={"global_crops_size": args.global_size, "local_crops_size": args.local_size,
               "local_crops_number": args.local_crops},
        dino={"head_n_prototypes": args.prototypes},
        ibot={"head_n_prototypes": args.prototypes, "separate_head": args.separate_ibot_head},
        train={"batch_size_per_gpu": args.batch, "official_epoch_length": args.steps, "centering": "centering"},
        optim={"epochs": 1, "warmup_epochs": 0, "freeze_last_layer_epochs": 0, "lr": 1e-4},
        compute={"autocast_dtype": args.dtype},
    )
    return cfg.model_dump(mode="json")


def count_state(args) -> dict:
    """Per-worker parameter / gradient / AdamW-state elements, unsharded and FSDP2-sharded over ``args.world`` ranks.

    Runs the library's own ``build_model`` + ``shard`` on a fake process group (no communication),
    rank 0 (FSDP2 pads dim 0 so rank 0 holds the largest shard). Run in a subprocess.
    """
    import torch
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from model.train.fsdp import local_numel
    from model.train.job import TrainJob
    from model.train.worker import build_model, shard

    job = TrainJob(kind="pretrain", ssl=ssl_json(args), files=["-"], rows=[1], out_dir="-", fsdp=True)

    def counts(model) -> dict:
        trainable = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                        for p in model.student.parameters() if p.requires_grad)
        return {"student_params": local_numel(model.student), "student_trainable": trainable,
                "teacher_params": local_numel(model.teacher)}

    model = build_model(job)
    full = counts(model)
    backbone = sum(p.numel() for p in model.student["backbone"].parameters())
    dist.init_process_group("fake", rank=0, world_size=args.world, store=FakeStore())
    try:
        shard(model, job, torch.device("cpu"), args.world)
        sharded = counts(model)
    finally:
        dist.destroy_process_group()
    return {"full": full, f"fsdp{args.world}": sharded, "backbone_params": backbone}


def state_bytes(c: dict) -> int:
    """fp32 student params + grads + AdamW exp_avg + exp_avg_sq, plus fp32 teacher params."""
    return 4 * (c["student_params"] + 3 * c["student_trainable"] + c["teacher_params"])


# ----------------------------------------------------------------------------- memory sampling
def _status_kib(pid: int) -> dict[str, int] | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(val.split()[0])
    return out if len(out) == 2 else None


def _cpu_seconds(pid: int) -> float | None:
    """user + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_per_step(cpu: list[tuple[int, float, int]], warmup: int, total_steps: int) -> dict[int, float]:
    """Per rank: CPU seconds of its training process per step, over the samples taken while steps ≥ warmup ran."""
    out = {}
    for rank in sorted({r for r, _, _ in cpu}):
        mine = [(c, d) for r, c, d in cpu if r == rank and warmup <= d < total_steps]
        if len(mine) >= 2 and mine[-1][1] > mine[0][1]:
            out[rank] = (mine[-1][0] - mine[0][0]) / (mine[-1][1] - mine[0][1])
    return out


def _malloc_env(pid: int) -> dict[str, str]:
    """The MALLOC_* variables the process was started with (checks that the allocator setting arrived)."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item.startswith(b"MALLOC_"))
    return {k: v for k, _, v in pairs}


class WorkerMemory(threading.Thread):
    """Samples VmRSS / VmHWM of the Ray Train worker processes named in ``<out_dir>/workers/rank-*.pid``.

    A sample counts as "during the steps" when, *after* reading /proc, the last step's metrics record
    is not yet in ``metrics.jsonl`` (the final checkpoint and export start only after that record).
    """

    def __init__(self, out_dir: Path, last_step: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid_dir, self.metrics = out_dir / "workers", out_dir / "metrics.jsonl"
        self.last_step, self.interval = last_step, interval
        self.stop = threading.Event()
        self.ranks: dict[int, dict] = {}
        self.trace: list[tuple[float, int, int, int]] = []  # (seconds, rank, VmRSS MiB, steps done)
        self.cpu: list[tuple[int, float, int]] = []  # (rank, user+system CPU seconds of the process, steps done)
        self.t0 = time.perf_counter()

    def _steps_done(self) -> int:
        from model.train.metrics import read_metrics

        return max((int(r["step"]) + 1 for r in read_metrics(self.metrics)), default=0)

    def sample(self) -> None:
        if not self.pid_dir.is_dir():
            return
        seen = {}
        for f in self.pid_dir.glob("rank-*.pid"):
            try:
                rank, pid = int(f.stem.split("-")[1]), int(f.read_text().strip())
            except (OSError, ValueError):
                continue
            st = _status_kib(pid)
            if st is not None:
                seen[rank] = (pid, st)
        if not seen:
            return
        done = self._steps_done()
        finished = done > self.last_step
        now = round(time.perf_counter() - self.t0, 2)
        for rank, (pid, st) in seen.items():
            self.trace.append((now, rank, st["VmRSS"] // 1024, done))
            cpu = _cpu_seconds(pid)
            if cpu is not None:
                self.cpu.append((rank, cpu, done))
            if rank not in self.ranks:
                self.ranks[rank] = {"pid": pid, "samples": 0, "peak_rss_steps_kib": 0, "peak_rss_kib": 0,
                                    "first_rss_kib": st["VmRSS"], "vmhwm_kib": 0, "malloc_env": _malloc_env(pid)}
            r = self.ranks[rank]
            r["samples"] += 1
            r["peak_rss_kib"] = max(r["peak_rss_kib"], st["VmRSS"])
            r["vmhwm_kib"] = max(r["vmhwm_kib"], st["VmHWM"])
            if not finished:
                r["peak_rss_steps_kib"] = max(r["peak_rss_steps_kib"], st["VmRSS"])

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()


# ----------------------------------------------------------------------------- runs
def run_one(spec: RunSpec, args, files: list[str], rows: list[int], work: Path) -> dict:
    from model.train.job import DataSettings, TrainJob
    from model.train.trainer import Scaling, run_job

    out = work / spec.name.replace("@", "-")
    shutil.rmtree(out, ignore_errors=True)
    threads = max(1, (os.cpu_count() or 1) // spec.workers)
    job = TrainJob(kind="pretrain", ssl=ssl_json(args), files=files, rows=rows, out_dir=str(out),
                   checkpoint_every=10**9, keep_checkpoints=1, metrics_every=1, precision="fp32", fsdp=spec.fsdp,
                   threads_per_worker=threads,
                   data=DataSettings(num_cpus=args.data_cpus, concurrency=1, prefetch=2))
    load_before = os.getloadavg()
    mem = WorkerMemory(out, job.total_steps - 1, args.sample_interval)
    mem.start()
    t0 = time.perf_counter()
    try:
        outcome = run_job(job, Scaling(workers=spec.workers, use_gpu=False, cpus_per_worker=args.cpus_per_worker,
                                       max_failures=0), name=f"scaling-{spec.name.replace('@', '-')}", progress=not args.quiet)
    finally:
        mem.stop.set()
        mem.join(timeout=5)
    wall = time.perf_counter() - t0
    timed = [r for r in outcome.metrics if r["step"] >= args.warmup and r.get("images_per_s")]
    if not timed:
        raise RuntimeError(f"{spec.name}: no metrics records after step {args.warmup}")
    global_batch = args.batch * spec.workers
    step_s = [global_batch / r["images_per_s"] for r in timed]
    ranks = {k: {kk: (v // 1024 if kk.endswith("_kib") else v) for kk, v in r.items()}
             for k, r in sorted(mem.ranks.items())}
    ranks = {k: {kk.replace("_kib", "_mib"): v for kk, v in r.items()} for k, r in ranks.items()}
    if len(ranks) != spec.workers or any(r["peak_rss_steps_mib"] == 0 for r in ranks.values()):
        raise RuntimeError(f"{spec.name}: worker memory not sampled for every rank ({ranks})")
    want = None if spec.glibc_malloc or args.mmap_threshold <= 0 else str(args.mmap_threshold)
    if any(r["malloc_env"].get("MALLOC_MMAP_THRESHOLD_") != want for r in ranks.values()):
        raise RuntimeError(f"{spec.name}: the workers' MALLOC_MMAP_THRESHOLD_ is not {want!r} ({ranks})")
    phases = phase_peaks(mem.trace, job.total_steps)
    floor = between_steps(mem.trace, job.total_steps)
    cpu = cpu_per_step(mem.cpu, args.warmup, job.total_steps)
    cpu_step = sum(cpu.values()) if len(cpu) == spec.workers else None
    return {
        "run": spec.name, "label": spec.label, "workers": spec.workers, "fsdp": spec.fsdp, "threads_per_worker": threads,
        "global_batch": global_batch, "timed_steps": len(timed),
        "images_per_s": len(timed) * global_batch / sum(step_s),
        "step_s_median": sorted(step_s)[len(step_s) // 2], "step_s": step_s,
        "worker_cpu_s_per_step": cpu_step, "worker_cpu_s_per_step_per_rank": cpu,
        "images_per_worker_cpu_s": global_batch / cpu_step if cpu_step else None,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "wall_s": wall, "first_loss": outcome.metrics[0].get("total"), "last_loss": outcome.metrics[-1].get("total"),
        "ranks": ranks,
        "peak_rss_steps_mib": max(r["peak_rss_steps_mib"] for r in ranks.values()),
        "vmhwm_mib": max(r["vmhwm_mib"] for r in ranks.values()),
        "first_rss_mib": max(r["first_rss_mib"] for r in ranks.values()),
        "rss_between_steps_mib": max(floor.values()), "rss_between_steps_per_rank_mib": floor,
        "phase_peak_rss_mib": phases,
        "rss_per_step_mib": rss_per_step(mem.trace),
    }


def phase_peaks(trace: list[tuple[float, int, int, int]], total_steps: int) -> dict[str, int]:
    """Max VmRSS over the workers until the first step is done (build, shard, step 0), during steps 1.., after."""
    out = {"until_first_step": 0, "later_steps": 0, "after_last_step": 0}
    for _, _, rss, done in trace:
        key = "until_first_step" if done == 0 else "later_steps" if done < total_steps else "after_last_step"
        out[key] = max(out[key], rss)
    return out


def between_steps(trace: list[tuple[float, int, int, int]], total_steps: int) -> dict[int, int]:
    """Per rank: the median over steps 1..last of the lowest VmRSS seen while that step ran."""
    lows: dict[int, dict[int, int]] = {}
    for _, rank, rss, done in trace:
        if 1 <= done < total_steps:
            per = lows.setdefault(rank, {})
            per[done] = min(per.get(done, rss), rss)
    return {rank: sorted(per.values())[len(per) // 2] for rank, per in sorted(lows.items()) if per}


def rss_per_step(trace: list[tuple[float, int, int, int]]) -> dict[int, list[list[int]]]:
    """Per rank: ``[steps done, lowest VmRSS, highest VmRSS]`` for each stretch between two metrics records."""
    spans: dict[int, dict[int, list[int]]] = {}
    for _, rank, rss, done in trace:
        lo_hi = spans.setdefault(rank, {}).setdefault(done, [rss, rss])
        lo_hi[0], lo_hi[1] = min(lo_hi[0], rss), max(lo_hi[1], rss)
    return {rank: [[done, *lo_hi] for done, lo_hi in sorted(per.items())] for rank, per in sorted(spans.items())}


def worker_env(args, glibc_malloc: bool) -> dict[str, str]:
    env = {"PYTHONPATH": str(REPO)}
    if not glibc_malloc and args.mmap_threshold > 0:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    return env


def start_ray(args, glibc_malloc: bool) -> None:
    """A fresh local Ray (``address="local"``, even when another instance runs on the machine)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False,
             configure_logging=False, object_store_memory=512 * MIB,
             runtime_env={"env_vars": worker_env(args, glibc_malloc)})
    ray.data.DataContext.get_current().enable_progress_bars = False


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024 / 1024
    return float("nan")


def theory(args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--count-state", *sys.argv[1:]]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    for line in r.stdout.splitlines():
        if line.startswith("COUNT "):
            return json.loads(line[len("COUNT "):])
    raise RuntimeError(f"parameter count failed (exit {r.returncode}): {r.stderr.strip()[-1500:]}")


def print_report(args, runs: dict[str, dict], counts: dict, ratios: dict, data: dict) -> None:
    f = counts["full"]
    print(f"\nmodel: {args.arch}/{args.patch} (backbone {counts['backbone_params'] / 1e6:.1f} M params) + DINO head "
          f"{args.prototypes} prototypes, {'separate iBOT head' if args.separate_ibot_head else 'shared with iBOT'}: student {f['student_params'] / 1e6:.1f} M params, "
          f"teacher {f['teacher_params'] / 1e6:.1f} M; fp32")
    print(f"crops: 2×{args.global_size} px + {args.local_crops}×{args.local_size} px, batch {args.batch} per worker; "
          f"{args.steps} steps, images/s over steps {args.warmup}..{args.steps - 1}")
    print(f"data: {data['images']} JPEGs (median {data['kib_median']} KiB) from {data['photos']} shipped photos, "
          f"{data['shards']} Parquet shards; Ray Data {args.data_cpus} CPU per worker")
    print(f"machine: {os.cpu_count()} CPUs ({cpu_model()}), {mem_total_gib():.1f} GiB RAM; Ray logical CPUs {args.ray_cpus}\n")
    head = (f"{'config':29s} {'workers':>7s} {'fsdp':>5s} {'thr':>3s} {'images/s':>9s} {'step s':>7s} {'img/CPU-s':>9s} "
            f"{'peak RSS MiB':>12s} {'between steps':>13s} {'VmHWM MiB':>9s} {'state MiB':>9s}")
    print(head)
    print("-" * len(head))
    for r in runs.values():
        print(f"{r['label']:29s} {r['workers']:7d} {r['fsdp']!s:>5s} {r['threads_per_worker']:3d} "
              f"{r['images_per_s']:9.2f} {r['step_s_median']:7.2f} {r['images_per_worker_cpu_s'] or float('nan'):9.2f} "
              f"{r['peak_rss_steps_mib']:12d} "
              f"{r['rss_between_steps_mib']:13d} {r['vmhwm_mib']:9d} {r['state_mib']:9.0f}")
    threshold = f"MALLOC_MMAP_THRESHOLD_={args.mmap_threshold}" if args.mmap_threshold > 0 else "glibc's default"
    print("  img/CPU-s: images per CPU-second of the training processes (their user+system time over the timed steps; "
          "Ray Data tasks not included) — less sensitive than images/s to a shared machine")
    print(f"  memory per worker process (max over the workers); allocator: {threshold} unless ', glibc'.")
    print(f"  peak RSS: largest VmRSS sampled every {args.sample_interval * 1000:.0f} ms from the worker's start through "
          "the last step; between steps: median over steps of the")
    print("  lowest VmRSS during the step; VmHWM: kernel peak, also covering the final checkpoint + export; state: "
          "theoretical fp32 params + grads + AdamW moments + teacher")
    print(f"  load average at the end (1/5/15 min): {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    for k, v in ratios.items():
        if v is not None:
            print(f"{k}: {v:.2f}" + ("" if "mib" in k else "x"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="training steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps left out of images/s")
    p.add_argument("--batch", type=int, default=8, help="images per worker per step")
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--patch", type=int, default=14)
    p.add_argument("--prototypes", type=int, default=131072, help="DINO (and iBOT) head prototypes")
    p.add_argument("--separate-ibot-head", action=argparse.BooleanOptionalAction, default=True,
                   help="a separate iBOT head (the official ViT-g/14 setting) instead of sharing the DINO head")
    p.add_argument("--global-size", type=int, default=56)
    p.add_argument("--local-size", type=int, default=28)
    p.add_argument("--local-crops", type=int, default=2)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="autocast dtype of the forward passes")
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    p.add_argument("--ray-cpus", type=float, default=4, help="logical CPUs of the local Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0)
    p.add_argument("--data-cpus", type=float, default=0.5, help="Ray Data CPUs per worker")
    p.add_argument("--mmap-threshold", type=int, default=MMAP_THRESHOLD, metavar="BYTES",
                   help="MALLOC_MMAP_THRESHOLD_ of the Ray workers (runs without the @glibc suffix); 0: not set")
    p.add_argument("--sample-interval", type=float, default=0.05)
    p.add_argument("--work", type=Path, default=None, help="working folder (default: a fresh temp dir, deleted)")
    p.add_argument("--keep", action="store_true", help="keep the working folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, default=None,
                   help="write the JSON here instead of benchmarks/results/train_scaling.json")
    p.add_argument("--count-state", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.count_state:
        print("COUNT " + json.dumps(count_state(args)), flush=True)
        return 0
    specs = [run_spec(n) for n in args.runs.split(",")]
    if args.warmup >= args.steps:
        p.error("--warmup must be < --steps")

    t_start = time.perf_counter()
    counts = theory(args)
    work = args.work or Path(tempfile.mkdtemp(prefix="lvd-train-scaling-"))
    work.mkdir(parents=True, exist_ok=True)
    import ray

    try:
        data_dir = work / "data"
        data_dir.mkdir(exist_ok=True)
        files, rows, data = make_dataset(data_dir, args.images, args.shards)
        runs: dict[str, dict] = {}
        ray_malloc = None
        for spec in specs:
            if spec.glibc_malloc != ray_malloc:
                start_ray(args, spec.glibc_malloc)
                ray_malloc = spec.glibc_malloc
            print(f"run {spec.name}: {spec.label} …", flush=True)
            r = run_one(spec, args, files, rows, work)
            c = counts["full"] if spec.workers == 1 or not spec.fsdp else counts[f"fsdp{spec.workers}"]
            r["state_mib"] = state_bytes(c) / MIB
            r["state_elements"] = c
            runs[spec.name] = r
            print(f"  {r['images_per_s']:.2f} images/s, peak RSS {r['peak_rss_steps_mib']} MiB per worker, "
                  f"wall {r['wall_s']:.0f} s", flush=True)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")

    def ratio(a: str, b: str, key: str) -> float | None:
        ok = a in runs and b in runs and runs[a][key] is not None and runs[b][key]
        return runs[a][key] / runs[b][key] if ok else None

    ratios: dict[str, float | None] = {
        "throughput 2w-fsdp / 1w": ratio("2w-fsdp", "1w", "images_per_s"),
        "throughput 2w-replicas / 1w": ratio("2w-replicas", "1w", "images_per_s"),
        "throughput 2w-fsdp / 2w-replicas": ratio("2w-fsdp", "2w-replicas", "images_per_s"),
        "images per CPU-s 2w-fsdp / 1w": ratio("2w-fsdp", "1w", "images_per_worker_cpu_s"),
        "images per CPU-s 2w-replicas / 1w": ratio("2w-replicas", "1w", "images_per_worker_cpu_s"),
    }
    for suffix in ("", GLIBC_SUFFIX):
        f, r = "2w-fsdp" + suffix, "2w-replicas" + suffix
        if f not in runs or r not in runs:
            continue
        tag = f" [{suffix[1:]}]" if suffix else ""
        ratios[f"per-worker peak RSS fsdp / replicas{tag}"] = ratio(f, r, "peak_rss_steps_mib")
        ratios[f"per-worker RSS between steps fsdp / replicas{tag}"] = ratio(f, r, "rss_between_steps_mib")
        ratios[f"per-worker saving replicas - fsdp, mib, peak{tag}"] = (
            runs[r]["peak_rss_steps_mib"] - runs[f]["peak_rss_steps_mib"])
        ratios[f"per-worker saving replicas - fsdp, mib, between steps{tag}"] = (
            runs[r]["rss_between_steps_mib"] - runs[f]["rss_between_steps_mib"])
        if not suffix:
            ratios["per-worker state fsdp / replicas (theory)"] = ratio(f, r, "state_mib")
            ratios["per-worker saving replicas - fsdp, mib (theory)"] = runs[r]["state_mib"] - runs[f]["state_mib"]
    print_report(args, runs, counts, ratios, data)
    total = time.perf_counter() - t_start
    print(f"\ntotal time {total:.0f} s")

    figures = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                   if k not in ("count_state", "world", "quiet", "keep", "out", "work")},
        "data": data, "params": counts, "runs": runs, "ratios": ratios,
        "images_per_s": {k: r["images_per_s"] for k, r in runs.items()},
        "peak_rss_mib_per_worker": {k: r["peak_rss_steps_mib"] for k, r in runs.items()},
        "state_mib_per_worker": {k: r["state_mib"] for k, r in runs.items()},
        "total_s": total,
    }
    machine = {"nproc": os.cpu_count(), "cpu_model": cpu_model(), "mem_gib": round(mem_total_gib(), 1),
               "python": platform.python_version(), "loadavg_at_end": os.getloadavg()}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"benchmark": "train_scaling", "machine": machine, "figures": figures},
                                       indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    else:
        from pipeline.plan import record_result

        print(f"wrote {record_result('train_scaling', figures, machine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
