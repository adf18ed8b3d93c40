"""On-disk layout of one stage unit: atomic shard writes, checksums, the manifest.

A unit directory holds ``part-NNNNN.parquet`` shards and, once complete, ``_manifest.json``.
Every file is written under a ``.tmp-`` name in the same directory and renamed into place, so
a reader never sees a partial file; the manifest is written last and its presence means done.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.digest import sha256_bytes, sha256_file  # noqa: F401 - re-exported for the engine

MANIFEST = "_manifest.json"
LOCK = ".lock"
TMP_PREFIX = ".tmp-"


class CorruptShardError(RuntimeError):
    """A shard whose bytes do not match the checksum in its manifest (or cannot be parsed)."""

    def __init__(self, stage: str, unit_dir: Path, shard: str, detail: str):
        self.stage, self.unit_dir, self.shard = stage, Path(unit_dir), shard
        super().__init__(f"corrupt shard {Path(unit_dir) / shard} of stage {stage!r}: {detail}")


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_index(name: str) -> int | None:
    if name.startswith("part-") and name.endswith(".parquet"):
        try:
            return int(name[5:-8])
        except ValueError:
            return None
    return None


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary name and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def table_to_parquet_bytes(table: pa.Table) -> bytes:
    """Serialise deterministically (same table → same bytes), zstd-compressed."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", write_statistics=True, store_schema=True)
    return sink.getvalue().to_pybytes()


def write_shard(unit_dir: Path, index: int, table: pa.Table) -> dict:
    """Atomically write one shard; returns its manifest entry (file, rows, bytes, sha256)."""
    data = table_to_parquet_bytes(table)
    atomic_write_bytes(unit_dir / shard_name(index), data)
    return {"file": shard_name(index), "rows": table.num_rows, "bytes": len(data), "sha256": sha256_bytes(data)}


def describe_existing_shard(path: Path) -> dict | None:
    """Manifest entry for a finished shard found on disk, or None if it is unreadable."""
    try:
        data = path.read_bytes()
        rows = pq.read_metadata(pa.BufferReader(data)).num_rows
    except Exception:  # noqa: BLE001 - any unreadable file is simply recomputed
        return None
    return {"file": path.name, "rows": rows, "bytes": len(data), "sha256": sha256_bytes(data)}


@dataclass(frozen=True)
class ShardRef:
    """Where one finished shard lives and what its manifest says: enough for any worker to read it."""

    stage: str
    unit_dir: str
    entry: dict = field(hash=False)
    partition: str | None = None

    def to_row(self) -> dict:
        """Plain columns (for a Ray Data row)."""
        return {"stage": self.stage, "unit_dir": self.unit_dir, "partition": self.partition,
                "file": self.entry["file"], "sha256": self.entry["sha256"]}

    @classmethod
    def from_row(cls, row: dict) -> "ShardRef":
        return cls(row["stage"], row["unit_dir"], {"file": row["file"], "sha256": row["sha256"]}, row["partition"])

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The shard's table, checksum verified."""
        return read_shard(self.stage, Path(self.unit_dir), self.entry, columns)


def read_shard(stage: str, unit_dir: Path, entry: dict, columns: list[str] | None = None) -> pa.Table:
    """Read one shard, verifying its checksum against the manifest entry first."""
    path = Path(unit_dir) / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CorruptShardError(stage, unit_dir, entry["file"], "file is missing") from None
    digest = sha256_bytes(data)
    if digest != entry["sha256"]:
        raise CorruptShardError(stage, unit_dir, entry["file"], f"sha256 {digest[:12]}… ≠ manifest {entry['sha256'][:12]}…")
    return pq.read_table(pa.BufferReader(data), columns=columns)


def verify_shard(unit_dir: Path, entry: dict, mode: str) -> str | None:
    """Why the shard does not match its manifest entry, or None when it does."""
    path = Path(unit_dir) / entry["file"]
    if not path.is_file():
        return "file is missing"
    if path.stat().st_size != entry["bytes"]:
        return f"size {path.stat().st_size} ≠ manifest {entry['bytes']}"
    if mode == "checksum":
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            return f"sha256 {digest[:12]}… ≠ manifest {entry['sha256'][:12]}…"
    return None


def read_manifest(unit_dir: Path) -> dict | None:
    path = Path(unit_dir) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, OSError):
        return None


def clean_temporaries(unit_dir: Path) -> int:
    """Remove leftovers of interrupted writes; returns how many were removed."""
    n = 0
    if unit_dir.is_dir():
        for p in unit_dir.iterdir():
            if p.name.startswith(TMP_PREFIX):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                n += 1
    return n


WORK_DIR = "work"  # a stage's resumable working state (e.g. training checkpoints); kept across kills


def clear_unit(unit_dir: Path) -> None:
    """Forget a unit's outputs: the manifest first (so it is no longer done), then its shards and work dir."""
    (unit_dir / MANIFEST).unlink(missing_ok=True)
    for p in unit_dir.glob("part-*.parquet"):
        p.unlink()
    work = unit_dir / WORK_DIR
    if work.is_dir():
        trash = unit_dir / f"{TMP_PREFIX}trash-{uuid.uuid4().hex[:6]}"
        os.replace(work, trash)
        shutil.rmtree(trash, ignore_errors=True)
    clean_temporaries(unit_dir)


def atomic_link_file(src: Path, dest: Path) -> None:
    """Publish an existing file at ``dest`` atomically: a hard link (or a copy) under a temp name, then rename."""
    tmp = dest.with_name(f"{TMP_PREFIX}{dest.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def discard_unit(unit_dir: Path) -> None:
    """Remove a unit's outputs: rename the directory away first (atomic), then delete it."""
    if not unit_dir.exists():
        return
    trash = unit_dir.with_name(f"{TMP_PREFIX}trash-{int(time.time())}-{uuid.uuid4().hex[:6]}-{unit_dir.name}")
    os.replace(unit_dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _view_is_current(view_dir: Path, manifest: dict, links: list[tuple[Path, Path]]) -> bool:
    if read_manifest(view_dir) != manifest:
        return False
    try:
        return all(os.path.samefile(view_dir / rel, target) for rel, target in links)
    except OSError:
        return False


def publish_view(view_dir: Path, manifest: dict, links: list[tuple[Path, Path]]) -> None:
    """Atomically (re)build a directory of hard links (copies across filesystems) plus a manifest.

    Publishers of one view take turns (a lock file beside it); each first sweeps what a killed
    publisher of the same view left (its half-built ``.tmp-…`` folder, or the old view renamed away).
    """
    with _locked(view_dir.parent / f"{LOCK}-{view_dir.name}"):
        for p in view_dir.parent.glob(f"{TMP_PREFIX}*-{view_dir.name}"):
            shutil.rmtree(p, ignore_errors=True)
        if _view_is_current(view_dir, manifest, links):
            return
        tmp = view_dir.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{view_dir.name}")
        for rel, target in links:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(target, tmp / rel)
            except OSError:
                shutil.copy2(target, tmp / rel)
        tmp.mkdir(parents=True, exist_ok=True)
        atomic_write_json(tmp / MANIFEST, manifest)
        discard_unit(view_dir)
        os.replace(tmp, view_dir)


@contextlib.contextmanager
def _locked(lock_file: Path, on_wait=None):
    """Hold an exclusive flock on ``lock_file`` (created if missing); ``on_wait`` is called if it is busy."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def unit_lock(unit_dir: Path, on_wait=None):
    """Hold an exclusive lock on a unit so two runs never compute it at once (the second waits)."""
    with _locked(unit_dir / LOCK, on_wait):
        yield
