"""Ingest benchmark: our `lvd stage ingest` against img2dataset on the same local URL list.

    .venv/bin/python benchmarks/ingest.py [--images 2000] [--out benchmarks/out]

One run:
1. generates N distinct JPEGs deterministically (cached in <out>/images; reruns reuse them),
2. serves them from a separate aiohttp process on 127.0.0.1 (benchmarks/_serve.py; robots.txt
   allows all), and writes the URL list <out>/urls.txt,
3. runs ``lvd stage ingest`` on it (fresh root in <out>/ours/<phase>/root every run),
4. runs img2dataset (own venv benchmarks/.venv-img2dataset, created if missing) on the same list,
5. prints wall time, images/s and peak RSS of each tool's whole process tree, and the ratios;
   writes them to <out>/ingest_benchmark.json.

Both tools get one untimed warm-up run on the first --warmup URLs (default 50) before the timed
runs (same order: ours, then img2dataset). Peak RSS is the maximum over time of the sum of VmRSS
of the tool's process and all its descendants (sampled every 50 ms from /proc; shared pages are
counted once per process, as `ps` would).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw, ImageFilter

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))
from pipeline.plan import record_result  # noqa: E402 - light: no torch, no FAISS

LVD = REPO / ".venv" / "bin" / "lvd"
SERVER_PY = REPO / ".venv" / "bin" / "python"

IMG2DATASET_VERSION = "1.47.0"  # the version pip gave on this machine when the benchmark was written
I2D_VENV = BENCH_DIR / ".venv-img2dataset"

GENERATOR_VERSION = 1  # bump when make_image changes: the image cache is then rebuilt
MAX_SIDE = 256
SHARD_ROWS = 500
PER_HOST_CONCURRENCY = 32
CONCURRENCY = 64
ENCODE_QUALITY = 90
I2D_PROCESSES = 2
I2D_THREADS = 32
SAMPLE_INTERVAL_S = 0.05
KIB = 1024
MIB = 1024 * 1024


# --------------------------------------------------------------------------- images


def make_image(index: int) -> tuple[bytes, int, int]:
    """A deterministic 'photo-like' JPEG: smooth colour field + shapes + blur + noise.

    Long side 400–1600 px, aspect 1:1–2:1 either way, ~50–300 KB (noise level steered
    towards a per-image target size).
    """
    rng = np.random.default_rng(1_000_003 * (index + 1))
    long_side = int(rng.integers(400, 1601))
    short = max(64, int(round(long_side * float(rng.uniform(0.5, 1.0)))))
    w, h = (long_side, short) if rng.random() < 0.6 else (short, long_side)
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3), dtype=np.uint8)
    canvas = Image.fromarray(grid, "RGB").resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(5, 25))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        sw, sh = int(rng.integers(w // 20 + 1, w // 2 + 2)), int(rng.integers(h // 20 + 1, h // 2 + 2))
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + sw, y0 + sh], fill=color)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + sw, y0 + sh], fill=color)
        else:
            draw.line([x0, y0, x0 + sw, y0 + sh], fill=color, width=int(rng.integers(2, 12)))
    base = np.asarray(canvas.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 2.0)))), dtype=np.int16)
    target = float(rng.uniform(60, 280)) * KIB
    quality = int(rng.integers(82, 93))
    sigma = float(np.clip(4.0 * target / (w * h), 1.0, 40.0))
    data = b""
    for _ in range(4):
        noise = rng.normal(0.0, sigma, size=(h, w, 3)).astype(np.int16)
        buf = io.BytesIO()
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB").save(buf, "JPEG", quality=quality)
        data = buf.getvalue()
        if 50 * KIB <= len(data) <= 300 * KIB:
            break
        sigma = float(np.clip(sigma * (target / len(data)) ** 1.2, 0.5, 60.0))
    return data, w, h


def image_name(index: int) -> str:
    return f"{index:06d}.jpg"


def _write_image(args: tuple[Path, int]) -> tuple[int, int, int, int]:
    folder, index = args
    data, w, h = make_image(index)
    path = folder / image_name(index)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    return index, len(data), w, h


def ensure_images(folder: Path, n: int) -> dict:
    """Generate the first ``n`` images into ``folder`` (missing ones only); return a summary."""
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("generator_version") != GENERATOR_VERSION:
        for p in folder.glob("*.jpg"):
            p.unlink()
        meta = {"generator_version": GENERATOR_VERSION, "images": {}}
    known: dict[str, list[int]] = meta["images"]
    todo = [i for i in range(n) if image_name(i) not in known or not (folder / image_name(i)).exists()]
    if todo:
        print(f"generating {len(todo)} image(s) into {folder} …", flush=True)
        t0 = time.monotonic()
        with Pool(os.cpu_count() or 1) as pool:
            for index, size, w, h in pool.imap_unordered(_write_image, [(folder, i) for i in todo], chunksize=8):
                known[image_name(index)] = [size, w, h]
        meta_path.write_text(json.dumps(meta, indent=0, sort_keys=True))
        print(f"  generated in {time.monotonic() - t0:.1f}s", flush=True)
    else:
        print(f"images: reusing {n} cached image(s) in {folder}", flush=True)
    sizes = np.array([known[image_name(i)][0] for i in range(n)])
    longs = np.array([max(known[image_name(i)][1:]) for i in range(n)])
    return {
        "count": n,
        "folder": str(folder),
        "total_mib": round(float(sizes.sum()) / MIB, 1),
        "kib": {"min": int(sizes.min() // KIB), "median": int(np.median(sizes) // KIB), "max": int(sizes.max() // KIB)},
        "long_side_px": {"min": int(longs.min()), "median": int(np.median(longs)), "max": int(longs.max())},
    }


# --------------------------------------------------------------------------- server


class Server:
    """benchmarks/_serve.py in its own process (project venv's Python, aiohttp)."""

    def __init__(self, folder: Path, log_path: Path):
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(SERVER_PY), str(BENCH_DIR / "_serve.py"), "--dir", str(folder), "--port", "0"],
            stdout=subprocess.PIPE, stderr=self.log, start_new_session=True)
        line = self._readline(timeout=120)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"image server did not start (got {line!r}); see {log_path}")
        _, port, files = line.split()
        self.port, self.files = int(port), int(files)
        self.base = f"http://127.0.0.1:{self.port}"

    def _readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().decode().strip() if ready else ""

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.base + path, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --------------------------------------------------------------------------- measuring


def _proc_table() -> dict[int, tuple[int, int, float, str]]:
    """pid → (ppid, session id, utime+stime seconds, state) of every process now visible in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2:].split()
        # fields[0]=state, [1]=ppid, [2]=pgrp, [3]=session, [11]=utime, [12]=stime
        out[int(name)] = (int(fields[1]), int(fields[3]), (int(fields[11]) + int(fields[12])) / tick,
                          fields[0].decode())
    return out


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0  # gone, or a zombie (no VmRSS line)


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()[:120]


def tree_pids(root: int, table: dict[int, tuple[int, int, float, str]]) -> list[int]:
    """``root``, its descendants, and anything else in its session (catches re-parented daemons)."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, *_) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = set(), [root]
    while stack:
        pid = stack.pop()
        if pid in found or pid not in table:
            continue
        found.add(pid)
        stack.extend(children.get(pid, []))
    found |= {pid for pid, (_, sid, *_) in table.items() if sid == root}
    return sorted(found)


@dataclass
class TreeSampler:
    """Samples the summed VmRSS (and CPU time) of a process tree every ``interval`` seconds."""

    root: int
    interval: float = SAMPLE_INTERVAL_S
    peak_kib: int = 0
    peak_breakdown: list = field(default_factory=list)
    samples: int = 0
    max_procs: int = 0
    cpu_s: dict = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        table = _proc_table()
        pids = tree_pids(self.root, table)
        rss = {pid: _rss_kib(pid) for pid in pids}
        total = sum(rss.values())
        self.samples += 1
        self.max_procs = max(self.max_procs, len(pids))
        for pid in pids:
            self.cpu_s[pid] = max(self.cpu_s.get(pid, 0.0), table[pid][2])
        if total > self.peak_kib:
            self.peak_kib = total
            top = sorted(rss.items(), key=lambda kv: -kv[1])[:6]
            self.peak_breakdown = [{"pid": p, "rss_mib": round(k / KIB, 1), "cmd": _cmdline(p)} for p, k in top]

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    @property
    def cpu_total_s(self) -> float:
        return round(sum(self.cpu_s.values()), 1)


@dataclass
class RunResult:
    ok: bool
    returncode: int | None
    seconds: float
    peak_rss_mib: float
    cpu_s: float
    max_procs: int
    samples: int
    peak_breakdown: list
    stdout: str
    stderr: str
    timed_out: bool = False
    leftover_pids: list = field(default_factory=list)


def run_measured(cmd: list[str], log_dir: Path, env: dict | None = None, timeout: float = 1800) -> RunResult:
    """Run ``cmd`` in its own session; wall time and peak tree RSS; logs into ``log_dir``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    (log_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(REPO),
                                env=env, start_new_session=True)
        sampler = TreeSampler(proc.pid).start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        seconds = time.monotonic() - t0
        sampler.stop()
    leftovers = _session_survivors(proc.pid, grace_s=5.0)
    leftover_info = [{"pid": p, "cmd": _cmdline(p)} for p in leftovers]
    if leftovers:  # processes of that run still alive after it exited: ours to end
        for p in leftovers:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
    return RunResult(
        ok=proc.returncode == 0 and not timed_out, returncode=proc.returncode, seconds=round(seconds, 2),
        peak_rss_mib=round(sampler.peak_kib / KIB, 1), cpu_s=sampler.cpu_total_s, max_procs=sampler.max_procs,
        samples=sampler.samples, peak_breakdown=sampler.peak_breakdown,
        stdout=out_path.read_text(errors="replace"), stderr=err_path.read_text(errors="replace"),
        timed_out=timed_out, leftover_pids=leftover_info)


def _session_survivors(sid: int, grace_s: float) -> list[int]:
    """Live (non-zombie) processes of session ``sid`` still there after up to ``grace_s`` seconds."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p, (_, s, _, state) in _proc_table().items() if s == sid and state not in ("Z", "X")]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# --------------------------------------------------------------------------- our ingest


def write_our_config(phase_dir: Path, urls: Path) -> Path:
    root = phase_dir / "root"
    if phase_dir.exists():
        shutil.rmtree(phase_dir)  # fresh root every run: nothing cached from a previous run
    phase_dir.mkdir(parents=True)
    cfg = {
        "name": "bench-ingest",
        "root": str(root),
        "sources": {"uncurated": [{"name": "bench", "urls": str(urls)}]},
        "engine": {"shard_rows": SHARD_ROWS},
        "ingest": {
            "allow_private_addresses": True,
            "max_side": MAX_SIDE,
            "per_host_concurrency": PER_HOST_CONCURRENCY,
            "concurrency": CONCURRENCY,
            "encode_format": "jpeg",
            "encode_quality": ENCODE_QUALITY,
        },
    }
    path = phase_dir / "bench-ingest.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def count_ours(config: Path, root: Path) -> dict:
    """ok/total from `lvd status --json`, cross-checked against the stored parquet shards."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    info: dict = {}
    proc = subprocess.run([str(LVD), "status", "--config", str(config), "--json"], capture_output=True,
                          text=True, cwd=str(REPO), timeout=300)
    if proc.returncode == 0:
        rows = json.loads(proc.stdout)
        st = next((r for r in rows if r["stage"] == "ingest"), None)
        if st:
            info["status_state"] = st["state"]
            info["status_rows"] = st["rows"]
            info["status_counts"] = (st.get("counts") or {}).get("status", {})
            info["status_path"] = st["path"]
    else:
        info["status_error"] = _tail(proc.stderr, 5)
    shards = sorted(root.glob("stages/ingest/*/part-*.parquet"))
    if shards:
        t = pq.ParquetDataset([str(s) for s in shards]).read(columns=["status", "error", "width", "height", "image"])
        ok = pc.equal(t["status"], "ok")
        okt = t.filter(ok)
        long_side = pc.max_element_wise(okt["width"], okt["height"]) if okt.num_rows else None
        info["parquet_rows"] = t.num_rows
        info["parquet_ok"] = okt.num_rows
        info["parquet_shards"] = len(shards)
        info["stored_mib"] = round(sum(s.stat().st_size for s in shards) / MIB, 1)
        if okt.num_rows:
            info["out_long_side_max"] = pc.max(long_side).as_py()
            info["out_image_kib_mean"] = round(pc.mean(pc.binary_length(okt["image"])).as_py() / KIB, 1)
        errs = t.filter(pc.invert(ok))
        if errs.num_rows:
            info["error_examples"] = sorted(set(e for e in errs["error"].to_pylist() if e))[:5]
    info["ok"] = info.get("status_counts", {}).get("ok", info.get("parquet_ok", 0))
    return info


# --------------------------------------------------------------------------- img2dataset


def ensure_img2dataset() -> tuple[Path | None, str]:
    """The img2dataset executable of its own venv (created/installed if missing), or (None, reason)."""
    exe = I2D_VENV / "bin" / "img2dataset"
    pip = I2D_VENV / "bin" / "pip"

    def installed_version() -> str | None:
        py = I2D_VENV / "bin" / "python"
        if not py.exists():
            return None
        r = subprocess.run([str(py), "-c", "from importlib.metadata import version; print(version('img2dataset'))"],
                           capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    if exe.exists() and installed_version() == IMG2DATASET_VERSION:
        return exe, ""
    python3 = shutil.which("python3") or sys.executable
    if not (I2D_VENV / "bin" / "python").exists():
        print(f"creating {I2D_VENV} with {python3} …", flush=True)
        r = subprocess.run([python3, "-m", "venv", str(I2D_VENV)], capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"`{python3} -m venv {I2D_VENV}` failed: {_tail(r.stderr or r.stdout, 5)}"
    print(f"installing img2dataset=={IMG2DATASET_VERSION} into {I2D_VENV} …", flush=True)
    r = subprocess.run([str(pip), "install", "-q", f"img2dataset=={IMG2DATASET_VERSION}"], capture_output=True, text=True)
    if r.returncode != 0 or not exe.exists():
        errors = [ln for ln in (r.stderr + r.stdout).splitlines() if "ERROR" in ln or "error" in ln.lower()]
        return None, f"pip install img2dataset=={IMG2DATASET_VERSION} failed (exit {r.returncode}): " + (
            " | ".join(errors[-5:]) or _tail(r.stderr or r.stdout, 5))
    return exe, ""


def i2d_env() -> dict:
    env = dict(os.environ)
    env["NO_ALBUMENTATIONS_UPDATE"] = "1"  # albumentations otherwise checks PyPI for updates at import
    env.pop("PYTHONPATH", None)
    return env


def i2d_command(exe: Path, urls: Path, out: Path, resize_mode: str) -> list[str]:
    return [
        str(exe), "--url_list", str(urls), "--input_format", "txt", "--output_folder", str(out),
        "--image_size", str(MAX_SIDE), "--resize_mode", resize_mode,
        "--output_format", "parquet", "--processes_count", str(I2D_PROCESSES), "--thread_count", str(I2D_THREADS),
        "--encode_format", "jpg", "--encode_quality", str(ENCODE_QUALITY),
        "--disallowed_header_directives", "[]",
        # img2dataset's default is one shard per 10,000 URLs, which would leave one of its two
        # processes idle on 2,000 URLs; 500 per shard mirrors our engine.shard_rows.
        "--number_sample_per_shard", str(SHARD_ROWS),
    ]


def count_i2d(out: Path) -> dict:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    info: dict = {"ok": 0, "count": 0, "status_dict": {}}
    for stats_file in sorted(out.glob("*_stats.json")):
        s = json.loads(stats_file.read_text())
        info["ok"] += int(s.get("successes", 0))
        info["count"] += int(s.get("count", 0))
        for k, v in (s.get("status_dict") or {}).items():
            info["status_dict"][k] = info["status_dict"].get(k, 0) + v
    info["stats_files"] = len(list(out.glob("*_stats.json")))
    shards = sorted(out.glob("*.parquet"))
    if shards:
        t = pq.ParquetDataset([str(s) for s in shards]).read(columns=["status", "width", "height", "jpg"])
        okt = t.filter(pc.equal(t["status"], "success"))
        info["parquet_rows"] = t.num_rows
        info["parquet_ok"] = okt.num_rows
        info["stored_mib"] = round(sum(s.stat().st_size for s in shards) / MIB, 1)
        if okt.num_rows:
            info["out_long_side_max"] = pc.max(pc.max_element_wise(okt["width"], okt["height"])).as_py()
            info["out_image_kib_mean"] = round(pc.mean(pc.binary_length(okt["jpg"])).as_py() / KIB, 1)
    return info


# --------------------------------------------------------------------------- driver


def machine_info() -> dict:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / MIB:.1f} GiB"
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "memory": mem, "python": platform.python_version(),
            "kernel": platform.release()}


def write_url_list(path: Path, base: str, n: int) -> Path:
    path.write_text("".join(f"{base}/img/{image_name(i)}\n" for i in range(n)))
    return path


def run_ours(urls: Path, phase_dir: Path, timeout: float) -> tuple[RunResult, dict]:
    config = write_our_config(phase_dir, urls)
    res = run_measured([str(LVD), "stage", "ingest", "--config", str(config)], phase_dir / "logs", timeout=timeout)
    counts = count_ours(config, phase_dir / "root") if res.ok else {"ok": 0}
    return res, counts


def run_i2d(exe: Path, urls: Path, phase_dir: Path, resize_mode: str, timeout: float) -> tuple[RunResult, dict]:
    if phase_dir.exists():
        shutil.rmtree(phase_dir)
    out = phase_dir / "output"
    res = run_measured(i2d_command(exe, urls, out, resize_mode), phase_dir / "logs", env=i2d_env(), timeout=timeout)
    return res, count_i2d(out)


def figures(res: RunResult, ok: int, total: int) -> dict:
    return {
        "images_ok": ok, "images_total": total, "seconds": res.seconds,
        "images_per_s": round(ok / res.seconds, 1) if res.seconds > 0 else None,
        "peak_rss_mib": res.peak_rss_mib, "cpu_s": res.cpu_s, "max_processes": res.max_procs,
        "rss_samples": res.samples, "peak_rss_breakdown": res.peak_breakdown, "returncode": res.returncode,
        "timed_out": res.timed_out, "leftover_processes": res.leftover_pids,
    }


def print_table(rows: list[tuple[str, dict | None, str]]) -> None:
    head = f"{'tool':<22} {'ok/total':>11} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13} {'CPU s':>7} {'procs':>5}"
    print(head)
    print("-" * len(head))
    for name, f, note in rows:
        if f is None:
            print(f"{name:<22} {note}")
            continue
        ips = "-" if f["images_per_s"] is None else f"{f['images_per_s']:.1f}"
        print(f"{name:<22} {f['images_ok']:>5}/{f['images_total']:<5} {f['seconds']:>8.1f} {ips:>9} "
              f"{f['peak_rss_mib']:>13.1f} {f['cpu_s']:>7.1f} {f['max_processes']:>5}" + (f"  {note}" if note else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark `lvd stage ingest` against img2dataset on a local URL list.")
    p.add_argument("--images", type=int, default=2000, help="number of distinct images (default 2000)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    p.add_argument("--warmup", type=int, default=50, help="URLs of the untimed warm-up run of each tool; 0 = none")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a tool's run is killed")
    p.add_argument("--i2d-resize-mode", default="keep_ratio_largest",
                   choices=["keep_ratio_largest", "keep_ratio"],
                   help="img2dataset --resize_mode. keep_ratio_largest (default) caps the LONGER side at 256 like "
                        "our max_side; keep_ratio makes the SHORTER side 256 (larger outputs, more work)")
    p.add_argument("--skip-img2dataset", action="store_true", help="only measure our ingest")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    warm_n = min(args.warmup, args.images)

    machine = machine_info()
    print(f"machine: nproc={machine['nproc']}, CPU: {machine['cpu_model']}, RAM {machine['memory']}, "
          f"Python {machine['python']}, kernel {machine['kernel']}", flush=True)
    images = ensure_images(out / "images", args.images)
    print(f"images: {images['count']} JPEGs, {images['total_mib']} MiB, size KiB min/median/max "
          f"{images['kib']['min']}/{images['kib']['median']}/{images['kib']['max']}, long side px "
          f"{images['long_side_px']['min']}/{images['long_side_px']['median']}/{images['long_side_px']['max']}", flush=True)

    i2d_exe, i2d_reason = (None, "skipped (--skip-img2dataset)") if args.skip_img2dataset else ensure_img2dataset()

    report: dict = {
        "benchmark": "ingest", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine, "images": images,
        "settings": {
            "max_side": MAX_SIDE, "encode": f"jpeg q{ENCODE_QUALITY}", "shard_rows": SHARD_ROWS,
            "ours": {"per_host_concurrency": PER_HOST_CONCURRENCY, "concurrency": CONCURRENCY,
                     "decode_workers": "default (one per CPU)"},
            "img2dataset": {"version": IMG2DATASET_VERSION, "processes_count": I2D_PROCESSES,
                            "thread_count": I2D_THREADS, "resize_mode": args.i2d_resize_mode,
                            "number_sample_per_shard": SHARD_ROWS},
            "warmup_urls": warm_n, "rss_sample_interval_s": SAMPLE_INTERVAL_S,
            "server": "benchmarks/_serve.py (aiohttp, bytes from memory, one process, same machine)",
        },
        "results": {},
    }

    server = Server(out / "images", out / "server.log")
    try:
        print(f"server: {server.base} serving {server.files} file(s) (pid {server.proc.pid})", flush=True)
        urls = write_url_list(out / "urls.txt", server.base, args.images)
        warm_urls = write_url_list(out / "urls_warmup.txt", server.base, warm_n) if warm_n else None

        if warm_urls:
            print(f"warm-up (untimed): each tool on the first {warm_n} URLs …", flush=True)
            wres, _ = run_ours(warm_urls, out / "ours" / "warmup", args.timeout)
            if not wres.ok:
                print(f"  ours warm-up failed (exit {wres.returncode}):\n{_tail(wres.stderr)}", flush=True)
            if i2d_exe:
                wres, _ = run_i2d(i2d_exe, warm_urls, out / "img2dataset" / "warmup", args.i2d_resize_mode, args.timeout)
                if not wres.ok:
                    print(f"  img2dataset warm-up failed (exit {wres.returncode}):\n{_tail(wres.stderr)}", flush=True)

        rows: list[tuple[str, dict | None, str]] = []

        print(f"timed: lvd stage ingest on {args.images} URLs …", flush=True)
        server.get("/_reset")
        ours_res, ours_counts = run_ours(urls, out / "ours" / "timed", args.timeout)
        ours_server = server.get("/_stats")
        ours_fig = figures(ours_res, ours_counts.get("ok", 0), args.images)
        ours_fig.update({"detail": ours_counts, "server_view": ours_server,
                         "logs": str(out / "ours" / "timed" / "logs")})
        report["results"]["ours"] = ours_fig
        if ours_res.ok:
            rows.append(("ours (lvd ingest)", ours_fig, ""))
        else:
            why = "timed out" if ours_res.timed_out else f"exit {ours_res.returncode}"
            ours_fig["error"] = _tail(ours_res.stderr, 20)
            rows.append(("ours (lvd ingest)", ours_fig, f"FAILED ({why})"))

        i2d_fig = None
        if i2d_exe:
            print(f"timed: img2dataset {IMG2DATASET_VERSION} on {args.images} URLs …", flush=True)
            server.get("/_reset")
            i2d_res, i2d_counts = run_i2d(i2d_exe, urls, out / "img2dataset" / "timed", args.i2d_resize_mode, args.timeout)
            i2d_server = server.get("/_stats")
            if i2d_res.ok:
                i2d_fig = figures(i2d_res, i2d_counts["ok"], args.images)
                i2d_fig.update({"detail": i2d_counts, "server_view": i2d_server,
                                "logs": str(out / "img2dataset" / "timed" / "logs")})
                report["results"]["img2dataset"] = i2d_fig
                rows.append((f"img2dataset {IMG2DATASET_VERSION}", i2d_fig, ""))
            else:
                why = "timed out" if i2d_res.timed_out else f"exit {i2d_res.returncode}"
                i2d_reason = f"run failed ({why}): {_tail(i2d_res.stderr, 8)}"
        if i2d_fig is None:
            report["results"]["img2dataset"] = {"unavailable": i2d_reason}
            rows.append(("img2dataset", None, f"unavailable — {(i2d_reason.splitlines() or ['?'])[0][:160]}"))
    finally:
        server.stop()

    print()
    print(f"ingest benchmark — {args.images} images, max side {MAX_SIDE}, JPEG q{ENCODE_QUALITY}; "
          f"machine: nproc={machine['nproc']}, {machine['cpu_model']}; "
          + (f"both tools warmed up on {warm_n} URLs" if warm_n else "neither tool warmed up"))
    print_table(rows)
    if ours_res.ok and i2d_fig and ours_fig["images_per_s"] and i2d_fig["images_per_s"]:
        ratios = {
            "throughput_ours_over_img2dataset": round(ours_fig["images_per_s"] / i2d_fig["images_per_s"], 2),
            "peak_rss_ours_over_img2dataset": round(ours_fig["peak_rss_mib"] / i2d_fig["peak_rss_mib"], 2),
            "cpu_ours_over_img2dataset": round(ours_fig["cpu_s"] / i2d_fig["cpu_s"], 2) if i2d_fig["cpu_s"] else None,
        }
        report["ratios"] = ratios
        print(f"ratios ours/img2dataset: throughput {ratios['throughput_ours_over_img2dataset']:.2f}x, "
              f"peak RSS {ratios['peak_rss_ours_over_img2dataset']:.2f}x, CPU {ratios['cpu_ours_over_img2dataset']}x")
    elif i2d_fig is None:
        print(f"img2dataset: unavailable — {i2d_reason}")
    if not ours_res.ok:
        print(f"ours: FAILED — stderr tail:\n{_tail(ours_res.stderr, 20)}")
    else:
        c = ours_counts
        print(f"ours: status counts {c.get('status_counts')}, output long side max {c.get('out_long_side_max')}, "
              f"{c.get('stored_mib')} MiB in {c.get('parquet_shards')} shard(s); "
              f"server saw {ours_server.get('by_kind')}")
    if i2d_fig:
        c = i2d_fig["detail"]
        print(f"img2dataset: {c['stats_files']} stats file(s), statuses {c['status_dict']}, output long side max "
              f"{c.get('out_long_side_max')}, {c.get('stored_mib')} MiB; server saw {i2d_fig['server_view'].get('by_kind')}")
    for name, f in (("ours", ours_fig), ("img2dataset", i2d_fig)):
        if f and f["peak_rss_breakdown"]:
            parts = ", ".join(f"{b['rss_mib']:.0f} MiB {b['cmd'][:60]!r}" for b in f["peak_rss_breakdown"][:4])
            print(f"{name} at peak RSS: {parts}")
    json_path = out / "ingest_benchmark.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {json_path}")
    if ours_res.ok:
        print(f"wrote {record_result('ingest', plan_figures(report), machine, report['when'])} (read by `lvd plan`)")
    return 0 if ours_res.ok else 1


def plan_figures(report: dict) -> dict:
    """Our ingest figures as `lvd plan` reads them (benchmarks/results/ingest.json)."""
    ours = report["results"]["ours"]
    return {"images": ours["images_ok"], "images_per_s": ours["images_per_s"],
            "core_s_per_image": round(ours["cpu_s"] / ours["images_ok"], 6), "peak_rss_mib": ours["peak_rss_mib"],
            "stored_kib_per_image": ours["detail"]["out_image_kib_mean"], "max_side": report["settings"]["max_side"],
            "source_kib_median": report["images"]["kib"]["median"]}


if __name__ == "__main__":
    sys.exit(main())
