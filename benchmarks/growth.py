"""Memory and growth: every curation stage at growing corpus sizes, time per image and peak memory.

    .venv/bin/python benchmarks/growth.py [--sizes 1000,5000,20000] [--out benchmarks/out]
                                          [--model open_clip:ViT-S-32:none] [--max-side 256]

Streaming means the cost of one image does not depend on how many others there are: per-image
seconds and peak memory must stay flat as the corpus grows. One run:

1. builds max(sizes) JPEGs with ``benchmarks/filters.py``'s corpus builder (crops, rescales, colour
   shifts of the real photos shipped with scikit-image / scikit-learn; 2 % byte-identical copies),
   cached in <out>/growth_images, plus ``--curated`` distinct JPEGs (other crops) in
   <out>/growth_curated;
2. serves the uncurated images from ``benchmarks/_serve.py`` on 127.0.0.1 (a separate process,
   not measured) and writes one URL list per size (the first N images);
3. for each size, in a FRESH child process (its own session, so Ray's processes of one size never
   count towards the next): a config with one uncurated ``urls:`` source (the crawler, over HTTP)
   and one curated ``images:`` source, fresh root; starts local Ray (timed apart); then
   ``engine.ensure(stage)`` for every curation stage in DAG order, ingest → dataset, each timed;
4. memory, sampled from /proc every ``--interval`` s during each stage, over the child's whole
   session (driver, ingest's decode processes, Ray's GCS, raylet and workers):
   * ``tree RSS``: the peak of the summed VmRSS (shared pages counted once per process, as `ps`);
   * ``tree PSS``: the peak of the summed Pss from smaps_rollup (shared pages split between the
     processes sharing them: the memory the tree really holds); and apart, its ``anon`` part (Pss_Anon:
     the processes' own heaps) and its ``shmem`` part (Pss_Shmem: Ray's object store in /dev/shm, whose
     pages stay mapped once touched, up to the store's capacity);
   * ``driver peak``: the driver's own VmHWM, reset before each stage (``/proc/self/clear_refs``);
5. CPU: ``filters.Clock`` around each stage: CPU seconds of the child's whole process tree
   (summed per process, so Ray workers that exit mid-stage count), of every other process on the
   machine, and the load average — on a shared machine wall time per image is inflated by others,
   CPU time per image much less;
6. prints per size and stage: seconds, ms per image (seconds ÷ N uncurated images), CPU ms per
   image, peak tree RSS / PSS and driver peak, then the growth ratios largest/smallest size per
   stage; writes the full report to <out>/growth_benchmark.json and the figures to
   benchmarks/results/growth.json (after every size, so a run stopped early keeps what it measured).

Settings (stated in the report): ingest ``max_side`` 256 by default (the benchmark measures
growth, not peak throughput; small images make the 20k run fit in ~30 min on 2 cores), random
``open_clip:ViT-S-32:none`` weights (no download), copy_dedup thresholds 0.98 / 0.95 as in the
demo (random weights put unrelated images at cosine ~0.6), a FIXED number of clusters (100) as the
paper's fixed 100,000 — per-image k-means cost is O(k), flat in N — and cluster-based retrieval.
Exact (flat) kNN in copy_dedup is O(N) per image below ``index.flat_max``: that growth is by design
(IVF / IVF-PQ above flat_max), and the table shows it.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (str(REPO), str(BENCH_DIR)):  # run as a script from anywhere; filters.py / ingest.py are imported from here
    if _p not in sys.path:
        sys.path.insert(0, _p)

from filters import Clock, ensure_images, machine_info, make_image, source_photos  # noqa: E402
from ingest import Server, _proc_table, tree_pids  # noqa: E402

PYTHON = REPO / ".venv" / "bin" / "python"
DEFAULT_SIZES = (1000, 5000, 20000)
DEFAULT_MODEL = "open_clip:ViT-S-32:none"
CURATED_SEED = 50_000_000  # curated images use generator indices far from the uncurated ones
N_CLUSTERS = 100
KIB = 1024


# --------------------------------------------------------------------------- memory sampling


def _status_kib(pid: int, keys: tuple[bytes, ...]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                k = line.split(b":", 1)[0]
                if k in keys:
                    out[k] = int(line.split()[1])
    except OSError:
        pass
    return out


PSS_KEYS = (b"Pss", b"Pss_Anon", b"Pss_Shmem")


def _pss_kib(pid: int) -> dict[bytes, int]:
    """Pss (all), Pss_Anon (the process's own heap) and Pss_Shmem (shared memory: Ray's object store) in KiB."""
    out = dict.fromkeys(PSS_KEYS, 0)
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as fh:
            for line in fh:
                k = line.split(b":", 1)[0]
                if k in out:
                    out[k] = int(line.split()[1])
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class TreeMemory:
    """Peak summed RSS and PSS of a session's processes, sampled by a thread between ``mark`` calls."""

    def __init__(self, session_root: int, interval: float):
        self.root, self.interval = session_root, interval
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.mark()
        self._thread = threading.Thread(target=self._loop, name="mem-sampler", daemon=True)
        self._thread.start()

    def mark(self) -> None:
        """Start a new window: peaks reset."""
        with self._lock:
            self.peak_rss = self.peak_pss = self.peak_anon = self.peak_shmem = 0
            self.peak_procs = 0
            self.peak_top: list[dict] = []
            self.samples = 0
            self.series: list[tuple[float, int]] = []  # (time, summed Pss_Anon KiB)

    def sample(self) -> None:
        pids = tree_pids(self.root, _proc_table())
        rss = {p: _status_kib(p, (b"VmRSS",)).get(b"VmRSS", 0) for p in pids}
        parts = [_pss_kib(p) for p in pids]
        pss, anon, shmem = (sum(d[k] for d in parts) for k in PSS_KEYS)
        total = sum(rss.values())
        with self._lock:
            self.samples += 1
            self.peak_procs = max(self.peak_procs, len(pids))
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_anon = max(self.peak_anon, anon)
            self.series.append((time.monotonic(), anon))
            self.peak_shmem = max(self.peak_shmem, shmem)
            if total > self.peak_rss:
                self.peak_rss = total
                self.peak_top = [{"pid": p, "rss_mib": round(k / KIB, 1), "cmd": _title(p)}
                                 for p, k in sorted(rss.items(), key=lambda kv: -kv[1])[:5]]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def window(self) -> dict:
        self.sample()
        with self._lock:
            return {**self._quarters(),
                    "tree_rss_mib": round(self.peak_rss / KIB, 1), "tree_pss_mib": round(self.peak_pss / KIB, 1),
                    "tree_anon_mib": round(self.peak_anon / KIB, 1), "tree_shmem_mib": round(self.peak_shmem / KIB, 1),
                    "processes": self.peak_procs, "samples": self.samples, "top": self.peak_top}

    def _quarters(self) -> dict:
        """Peak anonymous memory in the first and in the last quarter of the window: equal when the stage
        streams (its memory does not grow with the images it has done); None for windows under 8 samples."""
        if len(self.series) < 8:
            return {"anon_first_quarter_mib": None, "anon_last_quarter_mib": None}
        t0, t1 = self.series[0][0], self.series[-1][0]
        first = max(a for t, a in self.series if t <= t0 + (t1 - t0) / 4)
        last = max(a for t, a in self.series if t >= t1 - (t1 - t0) / 4)
        return {"anon_first_quarter_mib": round(first / KIB, 1), "anon_last_quarter_mib": round(last / KIB, 1)}

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:100]
    except OSError:
        return "?"


# --------------------------------------------------------------------------- corpus and config


def ensure_curated(folder: Path, n: int) -> None:
    """``n`` curated JPEGs: the same generator at far-away indices (other crops of the same photos)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = {p.name for p in folder.glob("*.jpg")}
    photos = source_photos()
    for i in range(n):
        name = f"c{i:05d}.jpg"
        if name not in have:
            (folder / name).write_bytes(make_image(CURATED_SEED + i, photos))
    for p in folder.glob("*.jpg"):
        if int(p.stem[1:]) >= n:
            p.unlink()


def write_config(work: Path, urls: Path, curated: Path, args: argparse.Namespace) -> Path:
    cfg = {
        "name": "bench-growth",
        "root": str(work / "root"),
        "sources": {"uncurated": [{"name": "web", "urls": str(urls)}],
                    "curated": [{"name": "curated", "images": str(curated)}], "eval": []},
        "engine": {"shard_rows": args.shard_rows, "verify": "checksum"},
        "ray": {"address": None},
        "ingest": {"allow_private_addresses": True, "max_side": args.max_side, "per_host_concurrency": 32,
                   "concurrency": 64},
        "embed": {"model": args.model, "batch_size": 32},
        "copy_dedup": {"threshold": 0.98, "eval_threshold": 0.95},
        "cluster": {"n_clusters": N_CLUSTERS, "niter": 20},
        "retrieve": {"method": "cluster"},
    }
    path = work / "bench-growth.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- one size (child process)


def run_one(args: argparse.Namespace) -> int:
    """Child: every curation stage at one size; writes its figures as JSON to --one-out."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.config import load_config
    from pipeline.engine import Engine
    from pipeline.raydata import ensure_ray

    config = load_config(args.one_config)
    engine = Engine(config, show_progress=False)
    stages = engine.stages_until(args.until)
    mem = TreeMemory(os.getsid(0), args.interval)
    can_reset = reset_peak_rss()
    result: dict[str, Any] = {"images": args.one_size, "stages": {}, "hwm_reset": can_reset}

    import ray

    mem.mark()
    t = time.monotonic()
    ensure_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    result["ray_start"] = {"seconds": round(time.monotonic() - t, 2), **mem.window()}
    for name in stages:
        mem.mark()
        reset_peak_rss()
        with Clock() as clock:  # CPU of our whole process tree, and of everybody else (shared machine)
            status = engine.ensure(name)
        seconds, n = clock.seconds, args.one_size
        window = mem.window()
        hwm = _status_kib(os.getpid(), (b"VmHWM",)).get(b"VmHWM", 0)
        result["stages"][name] = {"seconds": round(seconds, 2), "ms_per_image": round(1000 * seconds / n, 3),
                                  "cpu_s": round(clock.tree_cpu_s, 2), "cpu_ms_per_image": round(1000 * clock.tree_cpu_s / n, 3),
                                  "others_cpu_s": round(clock.others_cpu_s, 1), "loadavg_1m": round(clock.loadavg, 2),
                                  "rows": status.rows, "counts": status.counts, "driver_peak_mib": round(hwm / KIB, 1),
                                  **window}
        Path(args.one_out).write_text(json.dumps(result, indent=2, default=str))  # partial: a stopped run keeps it
        print(f"  [{n}] {name:<11} {seconds:7.1f}s  {1000 * seconds / n:7.2f} ms/img  CPU {1000 * clock.tree_cpu_s / n:7.2f} "
              f"ms/img  tree RSS {window['tree_rss_mib']:7.0f} MiB  PSS {window['tree_pss_mib']:7.0f} MiB  "
              f"driver {hwm / KIB:6.0f} MiB  anon 1st/last quarter {window['anon_first_quarter_mib']}/"
              f"{window['anon_last_quarter_mib']} MiB  rows {status.rows}  load {clock.loadavg:.1f}", flush=True)
    mem.stop()
    ray.shutdown()
    Path(args.one_out).write_text(json.dumps(result, indent=2, default=str))
    return 0


# --------------------------------------------------------------------------- driver


def figures(report: dict) -> dict:
    """The compact figures kept in benchmarks/results/growth.json (read by `lvd plan`)."""
    sizes = sorted(report["sizes"], key=int)
    stages = list(dict.fromkeys(s for n in sizes for s in report["sizes"][n]["stages"]))
    per_stage: dict[str, dict] = {}
    for s in stages:
        row = {n: {k: report["sizes"][n]["stages"][s][k] for k in
                   ("seconds", "ms_per_image", "cpu_ms_per_image", "loadavg_1m", "rows", "tree_rss_mib", "tree_pss_mib",
                    "tree_anon_mib", "tree_shmem_mib", "anon_first_quarter_mib", "anon_last_quarter_mib",
                    "driver_peak_mib", "processes")
                   if k in report["sizes"][n]["stages"][s]}
               for n in sizes if s in report["sizes"][n]["stages"]}
        have = sorted(row, key=int)
        lo, hi = row[have[0]], row[have[-1]]
        row["growth_sizes"] = [int(have[0]), int(have[-1])]
        row["growth_ms_per_image"] = round(hi["ms_per_image"] / lo["ms_per_image"], 2) if lo["ms_per_image"] else None
        row["growth_cpu_ms_per_image"] = round(hi["cpu_ms_per_image"] / lo["cpu_ms_per_image"], 2) \
            if lo["cpu_ms_per_image"] else None
        row["growth_tree_pss"] = round(hi["tree_pss_mib"] / lo["tree_pss_mib"], 2) if lo["tree_pss_mib"] else None
        row["growth_tree_anon"] = round(hi["tree_anon_mib"] / lo["tree_anon_mib"], 2) if lo.get("tree_anon_mib") else None
        first, last = hi.get("anon_first_quarter_mib"), hi.get("anon_last_quarter_mib")
        row["in_stage_anon_drift"] = round(last / first, 2) if first and last else None  # at the largest size
        row["growth_driver_peak"] = round(hi["driver_peak_mib"] / lo["driver_peak_mib"], 2) if lo["driver_peak_mib"] else None
        per_stage[s] = row
    return {"sizes": [int(n) for n in sizes], "settings": report["settings"], "stages": per_stage,
            "ray_start": {n: report["sizes"][n]["ray_start"] for n in sizes}}


def print_table(report: dict) -> None:
    fig = figures(report)
    sizes = [str(n) for n in fig["sizes"]]
    head = f"{'stage':<11} " + " ".join(f"{'ms/img@' + n:>12}" for n in sizes) + "  " + \
        " ".join(f"{'CPU ms/img@' + n:>16}" for n in sizes) + "  " + \
        " ".join(f"{'PSS MiB@' + n:>13}" for n in sizes) + "  " + \
        " ".join(f"{'anon MiB@' + n:>14}" for n in sizes) + "  " + \
        " ".join(f"{'driver@' + n:>12}" for n in sizes) + f"  {'time x':>6} {'CPU x':>6} {'PSS x':>6} {'anon x':>6} {'drift':>6}"
    print(head)
    print("-" * len(head))
    def cells(row: dict, key: str, width: int, fmt: str) -> str:
        return " ".join(format(row[n][key], fmt).rjust(width) if n in row else "-".rjust(width) for n in sizes)

    for s, row in fig["stages"].items():
        print(f"{s:<11} " + cells(row, "ms_per_image", 12, ".2f") + "  " + cells(row, "cpu_ms_per_image", 16, ".2f") +
              "  " + cells(row, "tree_pss_mib", 13, ".0f") + "  " + cells(row, "tree_anon_mib", 14, ".0f") +
              "  " + cells(row, "driver_peak_mib", 12, ".0f") +
              f"  {row['growth_ms_per_image'] or 0:>6.2f} {row['growth_cpu_ms_per_image'] or 0:>6.2f}"
              f" {row['growth_tree_pss'] or 0:>6.2f} {row['growth_tree_anon'] or 0:>6.2f}"
              f" {format(row['in_stage_anon_drift'], '.2f') if row['in_stage_anon_drift'] else '-':>6}")
    print("(x: largest size ÷ smallest, of wall ms per image, CPU ms per image, peak tree PSS and its anonymous part — "
          "the processes' own heaps, without Ray's shared-memory object store; flat = ~1. drift: at the largest size, peak "
          "anonymous memory in the stage's last quarter ÷ in its first (a streaming stage: ~1). "
          "CPU ms/img = CPU seconds of our whole process tree ÷ images: unlike wall time, not inflated by other "
          "processes on a shared machine)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Curation stages at growing corpus sizes: time per image and peak memory.")
    p.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma-separated corpus sizes")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"embed.model (default {DEFAULT_MODEL}: random weights)")
    p.add_argument("--max-side", type=int, default=256, help="ingest.max_side (default 256)")
    p.add_argument("--shard-rows", type=int, default=500, help="engine.shard_rows (default 500)")
    p.add_argument("--curated", type=int, default=100, help="curated images (retrieval queries; default 100)")
    p.add_argument("--interval", type=float, default=0.5, help="memory sampling interval in seconds (default 0.5)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before one size's run is abandoned")
    p.add_argument("--until", default="dataset", help="last stage to run (default dataset: every curation stage)")
    p.add_argument("--merge", action="store_true",
                   help="keep the sizes of the previous report (<out>/growth_benchmark.json) when its settings are the "
                        "same, e.g. to add a large size measured up to --until later")
    p.add_argument("--results", type=Path, default=BENCH_DIR / "results" / "growth.json",
                   help="where the figures go (default benchmarks/results/growth.json; read by `lvd plan`)")
    p.add_argument("--one-config", help=argparse.SUPPRESS)
    p.add_argument("--one-size", type=int, help=argparse.SUPPRESS)
    p.add_argument("--one-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one_config:
        return run_one(args)

    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        p.error("--sizes needs positive integers")
    out: Path = args.out.resolve()
    work_all = out / "growth"
    work_all.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    print(f"machine: nproc={machine['nproc']}, CPU: {machine['cpu_model']}, RAM {machine['memory']}; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    corpus = ensure_images(out / "growth_images", sizes[-1])
    ensure_curated(out / "growth_curated", args.curated)
    settings = {"model": args.model, "max_side": args.max_side, "shard_rows": args.shard_rows, "curated": args.curated,
                "n_clusters": N_CLUSTERS, "copy_dedup_threshold": 0.98, "retrieve": "cluster",
                "memory_interval_s": args.interval, "source": "urls over HTTP from 127.0.0.1 (benchmarks/_serve.py)"}
    report: dict[str, Any] = {"benchmark": "growth", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
                              "corpus": {k: corpus[k] for k in ("count", "total_mib", "kib", "long_side_px")},
                              "settings": settings, "sizes": {}}
    previous = out / "growth_benchmark.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        if old.get("settings") == settings:
            report["sizes"] = {n: v for n, v in old["sizes"].items() if int(n) not in sizes}
            print(f"merging sizes {sorted(report['sizes'], key=int)} of {previous}", flush=True)
        else:
            print(f"not merging {previous}: other settings", flush=True)
    server = Server(out / "growth_images", work_all / "server.log")
    try:
        for n in sizes:
            work = work_all / str(n)
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            urls = work / "urls.txt"
            urls.write_text("".join(f"{server.base}/img/{i:06d}.jpg\n" for i in range(n)))
            cfg = write_config(work, urls, out / "growth_curated", args)
            res_path = work / "result.json"
            print(f"size {n}: every curation stage (fresh process, fresh root) …", flush=True)
            t0 = time.monotonic()
            env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
            proc = subprocess.run([str(PYTHON), str(Path(__file__).resolve()), "--one-config", str(cfg),
                                   "--one-size", str(n), "--one-out", str(res_path), "--interval", str(args.interval),
                                   "--until", args.until],
                                  env=env, start_new_session=True, timeout=args.timeout)
            if proc.returncode != 0:
                print(f"size {n}: failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            report["sizes"][str(n)] = json.loads(res_path.read_text()) | {"wall_s": round(time.monotonic() - t0, 1)}
            _save(report, out, args.results)  # after every size: a long run stopped early keeps what it measured
    finally:
        server.stop()
    print_table(report)
    print(f"wrote {out / 'growth_benchmark.json'} and {args.results}")
    return 0


def _save(report: dict, out: Path, results: Path) -> None:
    _write(out / "growth_benchmark.json", report)
    _write(results, {"benchmark": "growth", "when": report["when"], "machine": report["machine"],
                     "corpus": report["corpus"], **figures(report)})


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
