"""Kill-anywhere harness: run one stage in a subprocess, SIGKILL it somewhere, check what is left.

``run_killed(config, stage, point)`` runs ``python -m pipeline.cli stage STAGE --config CONFIG`` in
its own session (process group), through a small ``-c`` wrapper (``CHILD``) that only the harness
uses: it reads ``POINT_ENV`` and, for a precise kill point, wraps ``pipeline.engine.store``'s
writers in the child so that it SIGKILLs itself at the n-th write of a kind — after a temporary
file was half written (``tmp``) or right after the rename (``renamed``). No library code knows
about any of this. Kinds: ``shard`` (part files), ``manifest`` (a unit's ``_manifest.json``),
``view`` (the manifest of a per-source stage's published view, written in a temp folder),
``artifact`` (files beside the shards, incl. hard-linked training exports).

Other kill points are decided by the parent: ``delay`` (a seeded random delay counted from the
moment the stage starts computing — restarted when the child's Ray instance is up, so the kill
lands in the stage's work, not in Ray's start-up) and ``file`` (as soon as a file appears, e.g. a
training checkpoint, plus a seeded delay). The parent then SIGKILLs the whole process group (the
stage starts its own local Ray: GCS, raylet, workers) and waits until no process carrying the
run's tag (``TAG_ENV``, inherited by every descendant, Ray workers included) is left.
``inspect_killed`` then checks what a reader could see: no manifest on an unfinished unit, only
complete part files, partial writes only under temporary names, and readers that refuse.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.engine import store

ROOT = Path(__file__).resolve().parent.parent
POINT_ENV = "LVD_KILLANYWHERE_POINT"  # read only by CHILD below
TAG_ENV = "LVD_KILLANYWHERE_TAG"  # marks every process of one killed run (Ray's included)
MARK = "KILLANYWHERE "
PART_RE = re.compile(r"^part-\d{5}\.parquet$")

# The child: wrap the engine's writers (harness side only), then run the normal CLI.
CHILD = r'''
import os, signal, sys
from pathlib import Path

def mark(msg):
    os.write(2, ("KILLANYWHERE " + msg + "\n").encode())

def die(msg):
    mark("kill " + msg)
    os.kill(os.getpid(), signal.SIGKILL)

spec = os.environ.pop("LVD_KILLANYWHERE_POINT", "")
stage = sys.argv[2]

import ray
from pipeline.engine import runner, store

_init = ray.init
def init(*args, **kwargs):
    out = _init(*args, **kwargs)
    mark("ray-ready")
    return out
ray.init = init

_compute = runner.Engine._compute_unit
def compute_unit(self, unit):
    if unit.stage == stage:
        mark("compute " + unit.label)
    return _compute(self, unit)
runner.Engine._compute_unit = compute_unit

if spec.startswith("write:"):
    _, what, phase, nth = spec.split(":")
    nth, seen = int(nth), [0]

    def kind(path):
        path = Path(path)
        if path.parent.parent.name != stage:
            return None  # another stage's file (e.g. an upstream view being republished)
        if path.parent.name.startswith(store.TMP_PREFIX):
            return "view"
        if path.name == store.MANIFEST:
            return "manifest"
        return "shard" if store.shard_index(path.name) is not None else "artifact"

    def hit(path):
        if kind(path) != what:
            return False
        seen[0] += 1
        return seen[0] == nth

    def half_write(path, data):
        tmp = store._tmp_path(Path(path))
        tmp.write_bytes(data[: len(data) // 2])
        return tmp.name

    def half_link(src, dest):
        tmp = Path(dest).with_name(f"{store.TMP_PREFIX}{Path(dest).name}-killed")
        os.link(src, tmp)
        return tmp.name

    def killing(write, half, dest_of):
        """``write`` that dies at the chosen one: after ``half`` left a temporary (phase tmp), or once renamed."""
        def patched(*args):
            if not hit(dest_of(*args)):
                return write(*args)
            name = Path(dest_of(*args)).name
            if phase == "tmp":
                die(f"{what} #{nth} {name}: half written as {half(*args)}")
            write(*args)
            die(f"{what} #{nth} {name}: renamed into place")
        return patched

    store.atomic_write_bytes = killing(store.atomic_write_bytes, half_write, lambda path, data: path)
    store.atomic_link_file = killing(store.atomic_link_file, half_link, lambda src, dest: dest)

from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
'''


@dataclass(frozen=True)
class KillPoint:
    """Where to kill: a precise write (``write``), a random ``delay``, or once a ``file`` appears."""

    how: str  # "write" | "delay" | "file"
    what: str = ""  # write: shard | manifest | view | artifact
    phase: str = ""  # write: tmp | renamed
    nth: int = 0  # write: the n-th write of that kind in the stage (1-based)
    seconds: float = 0.0  # delay / file: seconds to wait (after the start, or after the file appears)
    path: str = ""  # file: a glob, relative to the stage's folder (e.g. "*/work/checkpoints/latest")

    @classmethod
    def write(cls, what: str, phase: str, nth: int) -> KillPoint:
        assert what in ("shard", "manifest", "view", "artifact") and phase in ("tmp", "renamed") and nth >= 1
        return cls("write", what=what, phase=phase, nth=nth)

    @classmethod
    def delay(cls, seed: str, upto: float) -> KillPoint:
        """A delay drawn (seeded by ``seed``) uniformly from [0, upto] seconds."""
        return cls("delay", seconds=round(random.Random(seed).uniform(0, upto), 3))

    @classmethod
    def file(cls, glob: str, seed: str, upto: float) -> KillPoint:
        return cls("file", path=glob, seconds=round(random.Random(seed).uniform(0, upto), 3))

    def __str__(self) -> str:
        if self.how == "write":
            return f"{self.what}-{self.phase}#{self.nth}"
        if self.how == "file":
            return f"file:{self.path}+{self.seconds:.2f}s"
        return f"delay:{self.seconds:.2f}s"


@dataclass
class KillResult:
    point: KillPoint
    returncode: int
    killed: bool  # the child died of SIGKILL (rather than finishing)
    message: str  # the wrapper's "kill ..." line for a write point, else what the parent did
    seconds: float
    stderr: list[str] = field(default_factory=list)

    def tail(self, n: int = 25) -> str:
        return "\n".join(self.stderr[-n:])


def _tagged(tag: str) -> list[int]:
    """Live processes whose environment carries ``tag`` (zombies have none and are not counted)."""
    needle = f"{TAG_ENV}={tag}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if needle in (d / "environ").read_bytes().split(b"\0"):
                out.append(int(d.name))
        except OSError:
            pass
    return out


def _session(sid: int) -> list[int]:
    """Live processes of session ``sid`` (Ray workers leave the process group, not the session)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session …
            if int(fields[3]) == sid and fields[0] != "Z":
                out.append(int(d.name))
    return out


def reap(pid: int, tag: str, grace: float = 60.0) -> list[int]:
    """SIGKILL the child's process group and every other process of its session (Ray's workers put
    themselves in their own groups), then wait until no process carrying ``tag`` is left. Returns
    the pids still alive after ``grace`` seconds (then SIGKILLed one by one: this run started them)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for p in _session(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace
    left = _tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = _tagged(tag)
    for p in left:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def run_killed(config: Path, stage: str, point: KillPoint, *, stage_dir: Path | None = None,
               timeout: float = 900.0) -> KillResult:
    """Run ``lvd stage STAGE`` in a subprocess and kill it at ``point``; nothing of it is left running after."""
    tag = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the child starts its own local Ray
    spec = f"write:{point.what}:{point.phase}:{point.nth}" if point.how == "write" else ""
    env.update({TAG_ENV: tag, POINT_ENV: spec,
                "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                "RAY_USAGE_STATS_ENABLED": "0", "TQDM_DISABLE": "1"})
    if point.how == "file":
        assert stage_dir is not None and not any(stage_dir.glob(point.path)), f"{point.path} exists before the run"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, "stage", stage, "--config", str(config)], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    lines: list[str] = []
    started: list[float] = []  # times of "compute …" (first) and "ray-ready" markers

    def read() -> None:
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            lines.append(f"[{time.monotonic() - t0:6.1f}s] {line}")
            if line.startswith(MARK + "ray-ready") or (line.startswith(MARK + "compute") and not started):
                started.append(time.monotonic())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    message = ""
    try:
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                message = f"timeout after {timeout:.0f}s"
                break
            if point.how == "delay" and started and time.monotonic() >= started[-1] + point.seconds:
                message = f"parent: SIGKILL {point.seconds:.2f}s after the stage started"
                break
            if point.how == "file" and stage_dir is not None and any(stage_dir.glob(point.path)):
                time.sleep(point.seconds)
                message = f"parent: SIGKILL {point.seconds:.2f}s after {point.path} appeared"
                break
            time.sleep(0.02)
    finally:
        left = reap(proc.pid, tag)
        proc.wait()
        reader.join(timeout=10)
    if message.startswith("timeout"):
        raise TimeoutError(f"lvd stage {stage} ({point}) did not finish in {timeout:.0f}s:\n" + "\n".join(lines[-40:]))
    if left:
        raise AssertionError(f"processes of the killed run outlived its process group: {left}")
    for line in lines:
        if (MARK + "kill ") in line:
            message = line.split(MARK + "kill ", 1)[1]
    killed = proc.returncode == -signal.SIGKILL
    if not killed and proc.returncode != 0:
        raise AssertionError(f"lvd stage {stage} ({point}) failed with {proc.returncode}:\n" + "\n".join(lines[-40:]))
    return KillResult(point, proc.returncode, killed, message or "finished before the kill", time.monotonic() - t0,
                      lines)


# ---------------------------------------------------------------------------------------- checks
def inspect_killed(engine, stage: str) -> dict:
    """What a killed run left, checked from a reader's side; returns {unit label: state}.

    For every unit: files are only the lock, complete part files, declared artifacts, the work dir,
    the manifest — or temporaries named ``store.TMP_PREFIX…``; every part file reads whole. A unit
    without a (valid) manifest is not done, and ``Engine.read`` refuses it. The stage as a whole
    is ``done`` only when every unit is.
    """
    from pipeline.engine import StageError

    st = engine.stage(stage)
    allowed = {store.LOCK, store.MANIFEST, store.WORK_DIR, *st.artifacts}
    states = {}
    for unit in engine.units(stage):
        state, manifest = engine._unit_state(unit)
        states[unit.label] = state
        if not unit.dir.exists():
            assert state == "missing"
            continue
        for p in unit.dir.iterdir():
            if p.name.startswith(store.TMP_PREFIX):
                continue
            assert p.name in allowed or PART_RE.match(p.name), f"{unit.label}: unexpected file {p.name}"
            if PART_RE.match(p.name):
                pq.read_table(p)  # complete: a partial write never has a part-NNNNN name
        has_parts = any(PART_RE.match(p.name) for p in unit.dir.iterdir())
        if manifest is None:
            assert state == ("partial" if has_parts else "missing"), (unit.label, state)
            assert not (unit.dir / store.MANIFEST).exists() or state == "partial"
            part = unit.partition.name if unit.partition else None
            try:
                list(engine.read(stage, partition=part))
            except StageError:
                pass
            else:
                raise AssertionError(f"Engine.read accepted {unit.label}, which has no manifest")
        else:
            assert state == "done"
    stage_dir = engine.config.stages_dir / stage
    names = {u.fingerprint for u in engine.units(stage)} | {engine.stage_fingerprint(stage)}
    for p in stage_dir.iterdir() if stage_dir.is_dir() else []:
        assert (p.name in names or p.name.startswith(store.TMP_PREFIX)
                or p.name == f"{store.LOCK}-{engine.stage_fingerprint(stage)}"), f"{stage}: unexpected {p.name}"
    overall = engine.status(stage).state
    expect = "done" if all(s == "done" for s in states.values()) else (
        "missing" if all(s == "missing" for s in states.values()) else "partial")
    assert overall == expect, (overall, states)
    return states


def leftover_temporaries(engine, stage: str) -> list[str]:
    """Temporary names left in the stage's unit folders and beside its published view (after a finished
    run there must be none)."""
    view = engine.stage_dir(stage)
    beside = [p.name for p in view.parent.glob(f"{store.TMP_PREFIX}*-{view.name}")]
    return beside + [f"{u.label}/{p.name}" for u in engine.units(stage) if u.dir.is_dir()
                     for p in u.dir.iterdir() if p.name.startswith(store.TMP_PREFIX)]


def finished_shards_match(engine, stage: str, reference: dict[str, dict], same=None) -> list[str]:
    """Part files a killed run left must equal the reference run's shards: byte-identical, or
    ``same(path, reference manifest entry)`` when given; returns them."""
    seen = []
    for unit in engine.units(stage):
        ref = {e["file"]: e for e in reference[unit.label]["shards"]}
        for p in sorted(unit.dir.glob("part-*.parquet")) if unit.dir.is_dir() else []:
            assert p.name in ref, f"{unit.label}: {p.name} is not in the reference plan"
            ok = same(unit, p, ref[p.name]) if same else store.sha256_file(p) == ref[p.name]["sha256"]
            assert ok, f"{unit.label}/{p.name} differs from the reference"
            seen.append(f"{unit.label}/{p.name}")
    return seen


def manifests(engine, stage: str) -> dict[str, dict]:
    """{unit label: manifest} of a done stage."""
    out = {}
    for unit in engine.units(stage):
        m = store.read_manifest(unit.dir)
        assert m is not None, f"{unit.label} has no manifest"
        out[unit.label] = m
    return out


def json_without(data: bytes | str, drop: frozenset[str], replace: dict[str, str] | None = None):
    """Parsed JSON with keys in ``drop`` removed at any depth (and strings in ``replace`` substituted)."""
    text = data.decode() if isinstance(data, bytes) else data
    for a, b in (replace or {}).items():
        text = text.replace(json.dumps(a)[1:-1], b)

    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in drop}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    return strip(json.loads(text))
