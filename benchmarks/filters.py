"""Filter-stage benchmark: `hash_dedup`, `nsfw` and `face_blur` on Ray Data vs a plain loop.

    .venv/bin/python benchmarks/filters.py [--images 1000] [--out benchmarks/out] [--shard-rows 250]

One run:
1. builds N realistic JPEGs deterministically from the real photos shipped with scikit-image
   (``skimage/data/*.png|jpg``, read as files — no download functions) and scikit-learn
   (``sklearn/datasets/images/*.jpg``): random crops, rescales (long side 300–1024 px), flips,
   colour shifts, some greyscale, JPEG q70–95, plus ~2 % byte-identical copies (cached in
   <out>/filter_images; reruns reuse them),
2. runs the real ``ingest`` stage through ``pipeline.engine.Engine`` on a config with that folder
   as one uncurated ``images:`` source (fresh root <out>/filters/root every run),
3. starts Ray once (``pipeline.raydata.ensure_ray``) and runs one tiny Ray Data warm-up job; both
   are timed and reported separately, not in any stage's time,
4. for each of hash_dedup, nsfw, face_blur: ``engine.ensure(stage, force=True)`` timed wall-clock,
   then a PLAIN LOOP of the same per-image functions in this process (no Ray) over the same
   ingest shards read with ``engine.read``; cross-checks the results against the stage's output,
5. prints a table and writes everything to <out>/filters_benchmark.json.

Alongside wall time it samples /proc every 0.25 s: CPU of our process tree and of everything else
on the machine (it may be shared), and which Ray worker processes actually ran data tasks.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import logging
import os
import platform
import shutil
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from PIL import Image, ImageEnhance, ImageOps

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

GENERATOR_VERSION = 2  # bump when make_image changes: the image cache is then rebuilt
SOURCE_NAME = "bench"
STAGES = ("hash_dedup", "nsfw", "face_blur")
DUPLICATE_EVERY = 50  # every 50th image is a byte-identical copy of an earlier one (~2 %)
MIN_SIDE, MAX_SIDE = 300, 1024
MIB = 1024 * 1024

# Real photos shipped inside the installed packages (no network). Synthetic / tiny ones are left out.
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "camera.png",
                  "coins.png", "moon.png", "grass.png", "gravel.png", "brick.png", "cell.png", "clock_motion.png",
                  "page.png", "text.png", "horse.png")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


# --------------------------------------------------------------------------- corpus


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {package!r} is not installed in this venv")
    return Path(list(spec.submodule_search_locations)[0])


def source_photos() -> list[Path]:
    sk = _package_dir("skimage") / "data"
    sl = _package_dir("sklearn") / "datasets" / "images"
    paths = [sk / n for n in SKIMAGE_PHOTOS] + [sl / n for n in SKLEARN_PHOTOS]
    found = [p for p in paths if p.is_file()]
    if not found:
        raise SystemExit(f"no source photos found in {sk} or {sl}")
    return found


def make_image(index: int, photos: list[Path]) -> bytes:
    """A deterministic JPEG derived from one real photo: crop, rescale, flip, colour shift, re-encode."""
    rng = np.random.default_rng(7_919 * (index + 1))
    with Image.open(photos[int(rng.integers(len(photos)))]) as im:
        im.load()
        src = im.convert("L") if im.mode in ("L", "I", "I;16", "1") else im.convert("RGB")
    w0, h0 = src.size
    cw, ch = int(w0 * rng.uniform(0.45, 1.0)), int(h0 * rng.uniform(0.45, 1.0))
    x0, y0 = int(rng.integers(0, w0 - cw + 1)), int(rng.integers(0, h0 - ch + 1))
    img = src.crop((x0, y0, x0 + cw, y0 + ch))
    long_side = int(round(np.exp(rng.uniform(np.log(MIN_SIDE), np.log(MAX_SIDE)))))  # log-uniform: median ~550
    scale = long_side / max(cw, ch)
    img = img.resize((max(16, round(cw * scale)), max(16, round(ch * scale))), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    if img.mode == "RGB":
        if rng.random() < 0.1:
            img = img.convert("L")  # a few greyscale JPEGs, as on the web
        else:
            gains = rng.uniform(0.85, 1.15, 3)
            arr = np.asarray(img, dtype=np.float32) * gains
            img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
            img = ImageEnhance.Color(img).enhance(float(rng.uniform(0.7, 1.3)))
    img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
    img = ImageEnhance.Contrast(img).enhance(float(rng.uniform(0.85, 1.2)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(70, 96)), optimize=False)
    return buf.getvalue()


def image_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _write_image(args: tuple[Path, int, list[Path]]) -> tuple[int, int, int, int]:
    folder, index, photos = args
    if index > 0 and index % DUPLICATE_EVERY == 0:  # byte-identical copy of an earlier image
        data = make_image(int(np.random.default_rng(index).integers(0, index)), photos)
    else:
        data = make_image(index, photos)
    path = folder / image_name(index)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
    return index, len(data), w, h


def ensure_images(folder: Path, n: int) -> dict:
    """Generate the first ``n`` images into ``folder`` (missing ones only; extra ones removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("generator_version") != GENERATOR_VERSION:
        for p in folder.glob("*.jpg"):
            p.unlink()
        meta = {"generator_version": GENERATOR_VERSION, "images": {}}
    known: dict[str, list[int]] = meta["images"]
    for p in folder.glob("*.jpg"):  # the ingest source is the whole folder: keep exactly n files
        if not p.stem.isdigit() or int(p.stem) >= n:
            p.unlink()
            known.pop(p.name, None)
    todo = [i for i in range(n) if image_name(i) not in known or not (folder / image_name(i)).exists()]
    if todo:
        photos = source_photos()
        print(f"generating {len(todo)} image(s) from {len(photos)} real photos into {folder} …", flush=True)
        t0 = time.monotonic()
        with Pool(os.cpu_count() or 1) as pool:
            for index, size, w, h in pool.imap_unordered(_write_image, [(folder, i, photos) for i in todo],
                                                          chunksize=8):
                known[image_name(index)] = [size, w, h]
        meta_path.write_text(json.dumps(meta, indent=0, sort_keys=True))
        print(f"  generated in {time.monotonic() - t0:.1f}s", flush=True)
    else:
        print(f"images: reusing {n} cached image(s) in {folder}", flush=True)
    vals = [known[image_name(i)] for i in range(n)]
    sizes = np.array([v[0] for v in vals]) / 1024
    long_sides = np.array([max(v[1], v[2]) for v in vals])
    return {"folder": str(folder), "count": n, "total_mib": round(float(sizes.sum()) / 1024, 1),
            "kib": {"min": round(float(sizes.min()), 1), "median": round(float(np.median(sizes)), 1),
                    "max": round(float(sizes.max()), 1)},
            "long_side_px": {"min": int(long_sides.min()), "median": int(np.median(long_sides)),
                             "max": int(long_sides.max())},
            "byte_identical_copies": sum(1 for i in range(1, n) if i % DUPLICATE_EVERY == 0),
            "sources": [p.name for p in source_photos()]}


# --------------------------------------------------------------------------- measuring


def machine_info() -> dict:
    model = "?"
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "?")
    mem = "?"
    with contextlib.suppress(OSError, StopIteration):
        kib = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal:"))
        mem = f"{kib / MIB:.1f} GiB"
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory": mem, "python": platform.python_version(),
            "kernel": platform.release()}


_TICK = os.sysconf("SC_CLK_TCK")
# Ray's own service processes: never counted as workers.
RAY_SERVICES = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray::_StatsActor", "ray::_AutoscalingCoordinatorActor",
                "ray::ActorLocationTracker")


def _proc_table() -> dict[int, tuple[int, float, float]]:
    """pid -> (ppid, own CPU s, CPU s of reaped children) for every process."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            raw = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2:].split()  # fields from `state` on
        out[int(d)] = (int(f[1]), (int(f[11]) + int(f[12])) / _TICK, (int(f[13]) + int(f[14])) / _TICK)
    return out


def _descendants(table: dict[int, tuple[int, float, float]], root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def machine_busy_s() -> float:
    """CPU seconds all processes of the machine have used (from /proc/stat; idle and iowait excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + (f[7] if len(f) > 7 else 0)) / _TICK


def _runs_data_task(title: str) -> bool:
    """A Ray worker's process title while it executes a Ray Data task: ``ray::MapWorker(...).submit``
    for an actor (``.__init__`` while it loads its model, no suffix when idle), ``ray::MapBatches(...)``
    or similar for a task worker (``ray::IDLE`` between tasks)."""
    if title.startswith("ray::MapWorker("):
        return title.endswith(".submit")
    return title != "ray::IDLE"


def _ray_title(pid: int) -> str | None:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None
    return cmd if cmd.startswith("ray::") and not cmd.startswith(RAY_SERVICES) else None


class Clock:
    """Wall and CPU time of a block, sampled from /proc every ``interval`` seconds by a thread:

    * ``cpu_s``: this process (all threads);
    * ``tree_cpu_s``: this process and all its descendants (Ray's GCS, raylet and workers when Ray
      runs locally), summed per process as last sample minus first, so processes that start or die
      inside the block count for what they used in it (Ray reaps dead workers without adding their
      time to the raylet's, so a before/after total would lose them);
    * ``others_cpu_s``: what every OTHER process on the machine used meanwhile (shared machine);
    * per Ray worker process: CPU seconds, process titles, samples in which it ran a data task.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self._base: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._workers: dict[int, dict] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self, first: bool = False) -> None:
        table = _proc_table()
        for pid in _descendants(table, os.getpid()):
            if pid not in table:
                continue
            cpu = table[pid][1]
            self._base.setdefault(pid, cpu if first else 0.0)  # born inside the block: all its CPU counts
            self._last[pid] = cpu
            title = _ray_title(pid)
            if title is not None:
                w = self._workers.setdefault(pid, {"titles": set(), "tasks": 0})
                if title != "ray::IDLE":
                    w["titles"].add(title[:160])
                w["tasks"] += _runs_data_task(title)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "Clock":
        self.m0 = machine_busy_s()
        self._sample(first=True)
        self.t0, self.p0 = time.monotonic(), time.process_time()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.monotonic() - self.t0
        self.cpu_s = time.process_time() - self.p0
        self._stop.set()
        self._thread.join()
        self._sample()
        self.tree_cpu_s = sum(self._last[p] - self._base[p] for p in self._last)
        self.others_cpu_s = max(0.0, machine_busy_s() - self.m0 - self.tree_cpu_s)
        self.loadavg = os.getloadavg()[0]

    def workers(self) -> dict:
        """Ray workers that used CPU or ran a data task in the block; busy = seen running a data task."""
        rows = sorted(({"pid": pid, "cpu_s": round(self._last[pid] - self._base[pid], 2), "task_samples": w["tasks"],
                        "titles": sorted(w["titles"])} for pid, w in self._workers.items()), key=lambda r: -r["cpu_s"])
        rows = [r for r in rows if r["cpu_s"] > 0.05 or r["task_samples"]]
        return {"busy_workers": sum(1 for r in rows if r["task_samples"]), "sample_interval_s": self.interval,
                "workers": rows}


class MapShardsTimer:
    """Wraps ``map_shards`` where a stage module imported it: time spent inside Ray Data (the
    generator's ``next`` calls), time to its first output shard, input shards, and the worker
    slots it asks for (its own formula, evaluated at the same moment). Also times ``fit_pca``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[dict] = []
        self.fit_pca_s: list[float] = []

    def wrap(self, fn: Callable[..., Iterator]) -> Callable[..., Iterator]:
        def timed(inputs, fn_or_class, settings, *args, **kwargs):
            import ray

            is_class = isinstance(fn_or_class, type)
            cpus = (ray.available_resources() if is_class else ray.cluster_resources()).get("CPU", 1)
            rec = {"fn": getattr(fn_or_class, "__name__", str(fn_or_class)), "actors": is_class,
                   "input_shards": len(inputs), "batch_size": settings.batch_size,
                   "worker_slots": settings.concurrency or max(1, int(cpus // settings.num_cpus)),
                   "seconds": 0.0, "first_output_s": None}
            self.calls.append(rec)
            gen, t_start = fn(inputs, fn_or_class, settings, *args, **kwargs), time.monotonic()
            while True:
                t = time.monotonic()
                try:
                    item = next(gen)
                except StopIteration:
                    rec["seconds"] += time.monotonic() - t
                    return
                rec["seconds"] += time.monotonic() - t
                if rec["first_output_s"] is None:
                    rec["first_output_s"] = round(time.monotonic() - t_start, 3)
                yield item
        return timed

    def wrap_fit(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            t = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.fit_pca_s.append(round(time.monotonic() - t, 3))
        return timed


# --------------------------------------------------------------------------- config and engine


def write_config(folder: Path, images: Path, shard_rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": "bench-filters",
        "root": str(folder / "root"),
        "sources": {"uncurated": [{"name": SOURCE_NAME, "images": str(images)}], "curated": [], "eval": []},
        "engine": {"shard_rows": shard_rows, "verify": "checksum"},
        "ray": {"address": None},
        # Filter sections at their defaults: what a user gets without tuning.
    }
    path = folder / "bench-filters.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_ok_images(engine: Any, columns: list[str]) -> pa.Table:
    """The ok rows of the uncurated source, read through the engine's verified reader."""
    cols = list(dict.fromkeys([*columns, "status"]))
    tables = [t.filter(pc.equal(t["status"], "ok")) for t in engine.read("ingest", partition=SOURCE_NAME, columns=cols)]
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- plain loops


def plain_hash(engine: Any, cfg: Any) -> tuple[dict, dict]:
    from pipeline.hashing import fit_pca, pca_hash, thumbnail

    sec = cfg.hash_dedup
    if sec.method != "pca":
        raise SystemExit("the plain hash loop implements the PCA hash only (hash_dedup.method: pca)")
    parts: dict[str, float] = {}
    with Clock() as c:
        t = time.monotonic()
        table = read_ok_images(engine, ["image_id", "image"]).sort_by("image_id")
        parts["read_s"] = time.monotonic() - t
        t = time.monotonic()
        ids, blobs = table["image_id"].to_pylist(), table["image"].to_pylist()
        thumbs = [thumbnail(b, sec.thumb_size) for b in blobs]
        parts["thumbnail_s"] = time.monotonic() - t
        t = time.monotonic()
        sample = [th for th in thumbs[: sec.pca_sample] if th is not None]  # smallest image_ids, as the stage
        mean, comps = fit_pca(np.stack(sample), sec.bits)
        parts["fit_pca_s"] = time.monotonic() - t
        t = time.monotonic()
        ok = [i for i, th in enumerate(thumbs) if th is not None]
        codes = pca_hash(np.stack([thumbs[i] for i in ok]), mean, comps)
        parts["pca_hash_s"] = time.monotonic() - t
    out = {"images": len(ids), "seconds": c.seconds, "cpu_s": c.cpu_s, "others_cpu_s": c.others_cpu_s, "loadavg_1m": c.loadavg, "parts": parts}
    return out, {"ids": [ids[i] for i in ok], "codes": codes, "mean": mean, "comps": comps}


def plain_nsfw(engine: Any, cfg: Any) -> tuple[dict, dict]:
    from pipeline.filters.nsfw import NsfwScorer

    sec = cfg.nsfw
    threads = max(1, int(sec.num_cpus))  # what the stage gives each actor's onnxruntime session
    parts: dict[str, float] = {}
    with Clock() as c:
        t = time.monotonic()
        table = read_ok_images(engine, ["image_id", "image"])
        parts["read_s"] = time.monotonic() - t
        t = time.monotonic()
        scorer = NsfwScorer(str(sec.model) if sec.model else None, threads=threads)
        parts["model_load_s"] = time.monotonic() - t
        t = time.monotonic()
        blobs = table["image"].to_pylist()
        scores = np.concatenate([scorer.score(blobs[i:i + sec.batch_size]) for i in range(0, len(blobs), sec.batch_size)])
        parts["score_s"] = time.monotonic() - t
    out = {"images": len(blobs), "seconds": c.seconds, "cpu_s": c.cpu_s, "others_cpu_s": c.others_cpu_s, "loadavg_1m": c.loadavg, "parts": parts,
           "batch_size": sec.batch_size, "onnxruntime_threads": threads}
    return out, {"ids": table["image_id"].to_pylist(), "scores": scores}


def plain_face_blur(engine: Any, cfg: Any) -> tuple[dict, dict]:
    import cv2

    from pipeline.filters.faces import FaceDetector, blur_faces_in_bytes

    sec, ing = cfg.face_blur, cfg.ingest
    parts: dict[str, float] = {}
    with Clock() as c:
        t = time.monotonic()
        table = read_ok_images(engine, ["image_id", "image"])
        parts["read_s"] = time.monotonic() - t
        t = time.monotonic()
        det = FaceDetector(sec.detector, str(sec.model) if sec.model else None, min_size=sec.min_size,
                           score_threshold=sec.score_threshold)
        parts["model_load_s"] = time.monotonic() - t
        t = time.monotonic()
        faces = []
        for data in table["image"].to_pylist():
            _, found, _, _ = blur_faces_in_bytes(data, det, margin=sec.margin, fmt=ing.encode_format,
                                                 quality=ing.encode_quality)
            faces.append(len(found))
        parts["detect_blur_s"] = time.monotonic() - t
    out = {"images": table.num_rows, "seconds": c.seconds, "cpu_s": c.cpu_s, "others_cpu_s": c.others_cpu_s, "loadavg_1m": c.loadavg, "parts": parts,
           "cv2_threads": cv2.getNumThreads()}
    return out, {"ids": table["image_id"].to_pylist(), "faces": faces}


PLAIN: dict[str, Callable[[Any, Any], tuple[dict, dict]]] = {
    "hash_dedup": plain_hash, "nsfw": plain_nsfw, "face_blur": plain_face_blur}


# --------------------------------------------------------------------------- cross-checks


def check_hash(engine: Any, plain: dict) -> dict:
    model = np.load(io.BytesIO(engine.read_artifact("hash_dedup", "hash_model.npz")))
    dec = engine.read_table("hash_dedup", columns=["decision", "reason"])
    return {"pca_mean_max_abs_diff": float(np.abs(model["mean"] - plain["mean"]).max()),
            "pca_components_max_abs_diff": float(np.abs(model["components"] - plain["comps"]).max()),
            "plain_codes": int(len(plain["ids"])), "stage_rows": dec.num_rows}


def check_nsfw(engine: Any, plain: dict) -> dict:
    t = engine.read_table("nsfw", partition=SOURCE_NAME, columns=["image_id", "score"])
    ray_scores = dict(zip(t["image_id"].to_pylist(), t["score"].to_pylist()))
    diffs = [abs(ray_scores[i] - float(s)) for i, s in zip(plain["ids"], plain["scores"])
             if ray_scores.get(i) is not None and not np.isnan(s)]
    return {"stage_rows": t.num_rows, "compared": len(diffs), "missing_in_stage": sum(i not in ray_scores for i in plain["ids"]),
            "score_max_abs_diff": max(diffs) if diffs else None}


def check_face_blur(engine: Any, plain: dict) -> dict:
    t = engine.read_table("face_blur", partition=SOURCE_NAME, columns=["image_id", "faces"])
    ray_faces = dict(zip(t["image_id"].to_pylist(), t["faces"].to_pylist()))
    differ = [i for i, f in zip(plain["ids"], plain["faces"]) if ray_faces.get(i) != f]
    return {"stage_rows": t.num_rows, "images_with_faces_plain": sum(f > 0 for f in plain["faces"]),
            "images_with_faces_stage": sum(1 for f in ray_faces.values() if f), "faces_plain": sum(plain["faces"]),
            "faces_stage": sum(f or 0 for f in ray_faces.values()), "face_count_mismatches": len(differ),
            "mismatch_examples": differ[:5]}


CHECKS = {"hash_dedup": check_hash, "nsfw": check_nsfw, "face_blur": check_face_blur}


# --------------------------------------------------------------------------- driver


def run_stage(engine: Any, name: str, timer: MapShardsTimer) -> dict:
    section = getattr(engine.config, name)
    timer.reset()
    with Clock() as c:
        status = engine.ensure(name, force=True)
    inside = sum(call["seconds"] for call in timer.calls)
    slots = max((call["worker_slots"] for call in timer.calls), default=0)
    return {"seconds": c.seconds, "driver_cpu_s": c.cpu_s, "tree_cpu_s": c.tree_cpu_s, "others_cpu_s": c.others_cpu_s,
            "loadavg_1m": c.loadavg, "rows": status.rows, "state": status.state, "counts": status.counts,
            "fingerprint": status.fingerprint, "ray_worker_slots": slots, **c.workers(),
            "map_shards_calls": timer.calls, "fit_pca_s": timer.fit_pca_s, "inside_map_shards_s": inside, "outside_map_shards_s": c.seconds - inside,
            "batch_size": section.batch_size, "num_cpus_per_worker": section.num_cpus,
            "concurrency_setting": section.concurrency}


def summarise(ray: dict, plain: dict) -> dict:
    images = plain["images"]
    workers = ray["ray_worker_slots"]  # the parallelism the stage asks Ray Data for
    ideal = plain["seconds"] / workers
    return {
        "images": images,
        "ray_s": round(ray["seconds"], 2), "ray_images_per_s": round(images / ray["seconds"], 1),
        "plain_s": round(plain["seconds"], 2), "plain_images_per_s": round(images / plain["seconds"], 1),
        "ratio_ray_over_plain": round(ray["seconds"] / plain["seconds"], 2),
        "ray_workers": workers, "ray_busy_workers": ray["busy_workers"],
        "ideal_parallel_s": round(ideal, 2),
        "ray_efficiency_vs_ideal": round(ideal / ray["seconds"], 2),
        "plain_cores_used": round(plain["cpu_s"] / plain["seconds"], 2),
        "ray_tree_cpu_s": round(ray["tree_cpu_s"], 1), "plain_cpu_s": round(plain["cpu_s"], 1),
        "others_cpu_s_during_ray": round(ray["others_cpu_s"], 1),
        "others_cpu_s_during_plain": round(plain["others_cpu_s"], 1),
    }


def print_table(rows: dict[str, dict]) -> None:
    head = (f"{'stage':<11} {'images':>6} {'Ray s':>6} {'Ray img/s':>9} {'plain s':>7} {'plain img/s':>11} "
            f"{'Ray/plain':>9} {'workers':>7} {'busy':>4} {'ideal s':>7} {'Ray eff':>7} {'our CPU s R/p':>13} "
            f"{'others CPU s R/p':>16}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        print(f"{name:<11} {r['images']:>6} {r['ray_s']:>6.1f} {r['ray_images_per_s']:>9.1f} {r['plain_s']:>7.1f} "
              f"{r['plain_images_per_s']:>11.1f} {r['ratio_ray_over_plain']:>9.2f} {r['ray_workers']:>7} "
              f"{r['ray_busy_workers']:>4} {r['ideal_parallel_s']:>7.1f} {r['ray_efficiency_vs_ideal']:>7.2f} "
              f"{r['ray_tree_cpu_s']:>6.0f}/{r['plain_cpu_s']:<6.0f} "
              f"{r['others_cpu_s_during_ray']:>8.0f}/{r['others_cpu_s_during_plain']:<7.0f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the filter stages on Ray Data against a plain loop.")
    p.add_argument("--images", type=int, default=1000, help="number of images (default 1000)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    p.add_argument("--shard-rows", type=int, default=250,
                   help="engine.shard_rows (default 250: 4 ingest shards for 1000 images; the engine's default "
                        "1000 would give one shard, i.e. one Ray Data block, which no engine can split over workers)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--progress", action="store_true", help="keep Ray Data's progress bars (off by default)")
    args = p.parse_args(argv)
    if args.images < 2:
        p.error("--images must be at least 2 (the PCA hash needs 2 images)")
    stages = [s for s in args.stages.split(",") if s]
    if unknown := sorted(set(stages) - set(STAGES)):
        p.error(f"unknown stage(s) {unknown}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)

    from pipeline.config import load_config
    from pipeline.engine import Engine
    from pipeline.raydata import ensure_ray
    import pipeline.stages.hash_dedup as hash_mod
    import pipeline.stages.perimage as perimage_mod

    machine = machine_info()
    print(f"machine: nproc={machine['nproc']}, CPU: {machine['cpu_model']}, RAM {machine['memory']}, "
          f"Python {machine['python']}", flush=True)
    images = ensure_images(out / "filter_images", args.images)
    print(f"images: {images['count']} JPEGs from {len(images['sources'])} photos, {images['total_mib']} MiB, "
          f"KiB min/median/max {images['kib']['min']}/{images['kib']['median']}/{images['kib']['max']}, "
          f"long side px {images['long_side_px']['min']}/{images['long_side_px']['median']}/"
          f"{images['long_side_px']['max']}, {images['byte_identical_copies']} byte-identical copies", flush=True)

    work = out / "filters"
    root = work / "root"
    if root.exists():
        shutil.rmtree(root)
    config = load_config(write_config(work, out / "filter_images", args.shard_rows))
    engine = Engine(config, show_progress=args.progress)

    print("ingest (real stage, local folder source) …", flush=True)
    with Clock() as ci:
        ing = engine.ensure("ingest")
    ingest_shards = len(engine.shard_refs("ingest", partition=SOURCE_NAME))
    ingest = {"seconds": round(ci.seconds, 2), "rows": ing.rows, "counts": ing.counts, "shards": ingest_shards,
              "shard_rows": args.shard_rows, "images_per_s": round((ing.rows or 0) / ci.seconds, 1)}
    print(f"  {ing.rows} rows in {ingest_shards} shard(s), {ci.seconds:.1f}s, status counts {ing.counts}", flush=True)

    import ray

    with Clock() as cr:
        ensure_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = args.progress
    if not args.progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # per-dataset "Execution plan" INFO lines
    cpus = ray.available_resources().get("CPU")
    with Clock() as cw:  # spawn Ray Data's machinery once, so the first stage does not pay for it alone
        ray.data.range(64, override_num_blocks=4).map_batches(lambda b: b, batch_size=16).take_all()
    ray_info = {"version": ray.__version__, "start_s": round(cr.seconds, 2), "cpus": cpus,
                "ray_data_warmup_s": round(cw.seconds, 2)}
    print(f"ray {ray.__version__}: started in {cr.seconds:.1f}s ({cpus:.0f} CPUs); "
          f"tiny Ray Data warm-up job {cw.seconds:.1f}s (neither counted in stage times)", flush=True)

    timer = MapShardsTimer()
    hash_mod.map_shards = timer.wrap(hash_mod.map_shards)
    perimage_mod.map_shards = timer.wrap(perimage_mod.map_shards)
    hash_mod.fit_pca = timer.wrap_fit(hash_mod.fit_pca)

    results: dict[str, dict] = {}
    rows: dict[str, dict] = {}
    for name in stages:
        print(f"{name}: Ray Data run (engine.ensure force=True) …", flush=True)
        ray_fig = run_stage(engine, name, timer)
        print(f"  {ray_fig['seconds']:.1f}s, {ray_fig['rows']} rows, counts {ray_fig['counts']}; inside map_shards "
              f"{ray_fig['inside_map_shards_s']:.1f}s over {len(ray_fig['map_shards_calls'])} call(s), first output "
              f"after {[c['first_output_s'] for c in ray_fig['map_shards_calls']]}s", flush=True)
        print(f"  Ray workers: {ray_fig['ray_worker_slots']} slot(s), {ray_fig['busy_workers']} seen running data "
              f"tasks; per worker: " + "; ".join(f"pid {w['pid']} CPU {w['cpu_s']}s, {w['task_samples']} task sample(s)"
                                                 for w in ray_fig["workers"][:4])
              + (f"; fit_pca {ray_fig['fit_pca_s']}s" if ray_fig["fit_pca_s"] else ""), flush=True)
        print(f"{name}: plain loop (this process, no Ray) …", flush=True)
        plain_fig, plain_data = PLAIN[name](engine, config)
        print(f"  {plain_fig['seconds']:.1f}s, parts " +
              ", ".join(f"{k} {v:.1f}" for k, v in plain_fig["parts"].items()), flush=True)
        check = CHECKS[name](engine, plain_data)
        print(f"  cross-check: {check}", flush=True)
        rows[name] = summarise(ray_fig, plain_fig)
        results[name] = {"summary": rows[name], "ray": ray_fig, "plain": plain_fig, "check": check}

    ray.shutdown()
    print()
    print(f"filter benchmark — {args.images} images, {ingest_shards} ingest shard(s) of <= {args.shard_rows} rows; "
          f"nproc={machine['nproc']} ({machine['cpu_model']}); Ray {ray.__version__} start-up {ray_info['start_s']:.1f}s "
          f"(not in stage times); plain loop = one process in this driver")
    print_table(rows)
    print("Ray s = wall time of engine.ensure(stage, force=True) (plan + Ray Data + shard writes + manifest); "
          "plain s = engine.read of the ingest shards + model load + the per-image loop. "
          "workers = worker slots the stage asks Ray Data for (CPUs / num_cpus); busy = Ray worker processes seen "
          "(process title, sampled every 0.25 s) running a data task. ideal s = plain s / workers; Ray eff = ideal s / Ray s. "
          "our CPU s: Ray run = whole process tree (driver, raylet, workers), plain = this process. others CPU s = "
          "CPU used meanwhile by processes that are not ours (the machine may be shared).")
    for name, r in results.items():
        calls = r["ray"]["map_shards_calls"]
        print(f"{name}: inside map_shards {r['ray']['inside_map_shards_s']:.1f}s of {r['ray']['seconds']:.1f}s "
              f"({len(calls)} pass(es), first output after {[c['first_output_s'] for c in calls]}s); "
              f"plain cores used {r['summary']['plain_cores_used']}; check {r['check']}")

    report = {"benchmark": "filters", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
              "images": images, "ingest": ingest, "ray": ray_info,
              "settings": {"shard_rows": args.shard_rows, "config": str(config.path),
                           "sections": {n: getattr(config, n).model_dump(mode="json") for n in stages},
                           "ray_data_progress_bars": args.progress},
              "results": results}
    json_path = out / "filters_benchmark.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {json_path}")
    from pipeline.plan import record_result

    print(f"wrote {record_result('filters', plan_figures(report), machine, report['when'])} (read by `lvd plan`)")
    return 0


def plan_figures(report: dict) -> dict:
    """Per stage, the figures `lvd plan` reads (benchmarks/results/filters.json): core-seconds per image =
    Ray wall time x the worker slots the stage held ÷ images."""
    out = {}
    for name, r in report["results"].items():
        s = r["summary"]
        out[name] = {"images": s["images"], "images_per_s": s["ray_images_per_s"], "workers": s["ray_workers"],
                     "core_s_per_image": round(s["ray_s"] * s["ray_workers"] / s["images"], 6),
                     "tree_cpu_s_per_image": round(s["ray_tree_cpu_s"] / s["images"], 6)}
    return out


if __name__ == "__main__":
    sys.exit(main())
