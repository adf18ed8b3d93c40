"""The engine: fingerprints, status, compute-with-resume, verified reads. Used by CLI and flows."""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.engine import store
from pipeline.engine.fingerprint import fingerprint
from pipeline.engine.stage import REGISTRY, Partition, Shard, Stage, StageContext, load_builtin_stages

log = logging.getLogger("lvd")

LIBRARIES = ("pyarrow", "numpy", "pillow", "aiohttp", "warcio", "faiss-cpu", "torch", "ray", "prefect", "open-clip-torch")
MAX_CORRUPTION_RETRIES = 3


@dataclass(frozen=True)
class Unit:
    """One stage × partition: a directory of shards and a manifest."""

    stage: str
    partition: Partition | None
    fingerprint: str
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.stage}[{self.partition.name}]" if self.partition else self.stage


@dataclass
class StageStatus:
    """A row of ``lvd status``."""

    stage: str
    state: str  # done | partial | missing
    fingerprint: str
    rows: int | None
    path: str
    seconds: float | None
    counts: dict | None = None
    computed: bool = False  # True when this call did work

    def as_dict(self) -> dict:
        return asdict(self)


class StageError(RuntimeError):
    """A stage failed in a way the user must act on (message says how)."""


def _library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Engine:
    """Computes and reads stages of one run config. Stateless between calls except caches of fingerprints."""

    def __init__(self, config: Config, show_progress: bool = True, registry: dict[str, Stage] | None = None):
        if registry is None:
            load_builtin_stages()
            registry = REGISTRY
        self.registry = registry
        self.config = config
        self.show_progress = show_progress
        self._fp_cache: dict[tuple[str, str | None], str] = {}

    # ---- the DAG -------------------------------------------------------------------------
    def stage(self, name: str) -> Stage:
        try:
            return self.registry[name]
        except KeyError:
            raise StageError(f"unknown stage {name!r}; stages are: {', '.join(self.registry)}") from None

    def stage_names(self) -> list[str]:
        return list(self.registry)

    def upstream_closure(self, name: str) -> list[str]:
        """``name`` and everything it depends on, upstream first."""
        seen: list[str] = []

        def visit(n: str) -> None:
            for u in self.stage(n).upstream:
                visit(u)
            if n not in seen:
                seen.append(n)

        visit(name)
        return seen

    def partitions(self, name: str) -> list[Partition | None]:
        stage = self.stage(name)
        if not stage.per_source:
            return [None]
        return [Partition(kind, src) for kind, src in self.config.sources.all() if kind in stage.kinds]

    def context(self, name: str, partition: Partition | None) -> StageContext:
        return StageContext(self.config, self.stage(name), partition, self, show_progress=self.show_progress)

    # ---- fingerprints --------------------------------------------------------------------
    def unit_fingerprint(self, name: str, partition: Partition | None) -> str:
        key = (name, partition.name if partition else None)
        if key not in self._fp_cache:
            stage = self.stage(name)
            ctx = self.context(name, partition)
            upstream = {}
            for u in stage.upstream:
                up = self.stage(u)
                upstream[u] = self.unit_fingerprint(u, partition) if (up.per_source and partition) else self.stage_fingerprint(u)
            self._fp_cache[key] = fingerprint({
                "stage": name,
                "version": stage.version,
                "config": stage.config_for_fingerprint(ctx),
                "shard_rows": self.config.engine.shard_rows,
                "partition": {"kind": partition.kind, "name": partition.name} if partition else None,
                "inputs": stage.fingerprint_inputs(ctx),
                "upstream": upstream,
            })
        return self._fp_cache[key]

    def stage_fingerprint(self, name: str) -> str:
        stage = self.stage(name)
        if not stage.per_source:
            return self.unit_fingerprint(name, None)
        return fingerprint({"stage": name, "units": {p.name: self.unit_fingerprint(name, p) for p in self.partitions(name)}})

    def units(self, name: str) -> list[Unit]:
        return [
            Unit(name, p, fp, self.config.stages_dir / name / fp)
            for p in self.partitions(name)
            for fp in [self.unit_fingerprint(name, p)]
        ]

    def stage_dir(self, name: str) -> Path:
        return self.config.stages_dir / name / self.stage_fingerprint(name)

    # ---- state ---------------------------------------------------------------------------
    def _unit_state(self, unit: Unit) -> tuple[str, dict | None]:
        manifest = store.read_manifest(unit.dir)
        if manifest is not None and manifest.get("fingerprint") == unit.fingerprint:
            if manifest.get("inputs") == self._upstream_contents(unit):
                return "done", manifest
            return "partial", None  # an upstream was recomputed with different content since
        if unit.dir.is_dir() and any(store.shard_index(p.name) is not None for p in unit.dir.iterdir()):
            return "partial", None
        return "missing", None

    def _upstream_contents(self, unit: Unit) -> dict[str, str | None]:
        """Content digests of the upstream units this unit was (or would be) computed from."""
        out: dict[str, str | None] = {}
        for u in self.stage(unit.stage).upstream:
            parts = [unit.partition] if (self.stage(u).per_source and unit.partition) else self.partitions(u)
            for p in parts:
                key = f"{u}[{p.name}]" if p else u
                m = store.read_manifest(self.config.stages_dir / u / self.unit_fingerprint(u, p))
                out[key] = m.get("content") if m else None
        return out

    def status(self, name: str) -> StageStatus:
        units = self.units(name)
        states = [self._unit_state(u) for u in units]
        manifests = [m for _, m in states if m]
        if all(s == "done" for s, _ in states):
            state = "done"
        elif any(s != "missing" for s, _ in states):
            state = "partial"
        else:
            state = "missing"
        rows = sum(m["rows"] for m in manifests) if manifests or not units else None
        seconds = round(sum(m.get("seconds", 0.0) for m in manifests), 2) if manifests else None
        counts: dict[str, dict] = {}
        for m in manifests:
            for col, vc in (m.get("counts") or {}).items():
                agg = counts.setdefault(col, {})
                for k, v in vc.items():
                    agg[k] = agg.get(k, 0) + v
        stage = self.stage(name)
        path = units[0].dir if (units and not stage.per_source) else self.stage_dir(name)
        return StageStatus(name, state, self.stage_fingerprint(name), rows, str(path), seconds, counts or None)

    def status_all(self) -> list[StageStatus]:
        return [self.status(n) for n in self.stage_names()]

    # ---- compute -------------------------------------------------------------------------
    def stages_until(self, until: str | None = None) -> list[str]:
        """The DAG's stages in order, stopping after ``until`` (every stage when None)."""
        names = self.stage_names()
        return names if until is None else names[: names.index(self.stage(until).name) + 1]

    def run(self, until: str | None = None, force: bool = False) -> list[StageStatus]:
        """Ensure every stage (in DAG order, up to and including ``until``) is done."""
        return [self.ensure(n, force=force and n == until) for n in self.stages_until(until)]

    def ensure(self, name: str, force: bool = False) -> StageStatus:
        """Make ``name`` (and, first, its upstream stages) done; ``force`` recomputes ``name`` itself.

        A done stage is re-checked before reuse (``engine.verify``: checksums or sizes); its
        upstream stages get the cheap size check only, since reading them verifies checksums.
        """
        for u in self.upstream_closure(name)[:-1]:
            self._ensure_one(u, force=False, verify="size")
        return self._ensure_one(name, force=force)

    def _ensure_one(self, name: str, force: bool, verify: str | None = None) -> StageStatus:
        verify = verify or self.config.engine.verify
        computed = False
        for unit in self.units(name):
            for attempt in range(MAX_CORRUPTION_RETRIES + 1):
                try:
                    computed |= self._ensure_unit(unit, force=force and attempt == 0, verify=verify)
                    break
                except store.CorruptShardError as err:
                    if attempt == MAX_CORRUPTION_RETRIES:
                        raise
                    log.warning("%s — recomputing that shard, then retrying %s", err, unit.label)
                    self._invalidate_shard(err)
        if self.stage(name).per_source:
            self._write_stage_manifest(name)
        status = self.status(name)
        status.computed = computed
        return status

    def _invalidate_shard(self, err: store.CorruptShardError) -> None:
        (err.unit_dir / store.MANIFEST).unlink(missing_ok=True)
        (err.unit_dir / err.shard).unlink(missing_ok=True)
        self._ensure_one(err.stage, force=False)

    def _ensure_unit(self, unit: Unit, force: bool, verify: str) -> bool:
        """Returns True when work was done."""
        wait = lambda: log.info("%s: another process is computing it; waiting", unit.label)  # noqa: E731
        with store.unit_lock(unit.dir, on_wait=wait):
            return self._ensure_unit_locked(unit, force, verify)

    def _ensure_unit_locked(self, unit: Unit, force: bool, verify: str) -> bool:
        if force:
            log.info("%s: --force, discarding %s", unit.label, unit.dir)
            store.clear_unit(unit.dir)
        state, manifest = self._unit_state(unit)
        if state == "done" and manifest is not None:
            problems = self._verify(unit, manifest, verify)
            if not problems:
                return False
            for shard, why in problems:
                log.warning("corrupt shard %s of %s (%s): recomputing it", unit.dir / shard, unit.label, why)
                (unit.dir / shard).unlink(missing_ok=True)
            (unit.dir / store.MANIFEST).unlink(missing_ok=True)
        elif state == "partial" and (unit.dir / store.MANIFEST).exists():
            (unit.dir / store.MANIFEST).unlink()  # stale: its upstream changed content
            for p in unit.dir.glob("part-*.parquet"):
                p.unlink()
        self._compute_unit(unit)
        return True

    def _verify(self, unit: Unit, manifest: dict, mode: str) -> list[tuple[str, str]]:
        out = []
        artifacts = [{"file": n, **a} for n, a in (manifest.get("artifacts") or {}).items()]
        for entry in manifest["shards"] + artifacts:
            why = store.verify_shard(unit.dir, entry, mode)
            if why:
                out.append((entry["file"], why))
        return out

    def _compute_unit(self, unit: Unit) -> None:
        stage = self.stage(unit.stage)
        ctx = self.context(unit.stage, unit.partition)
        ctx.unit_dir = unit.dir
        unit.dir.mkdir(parents=True, exist_ok=True)
        store.clean_temporaries(unit.dir)
        started, t0 = _now(), time.monotonic()
        inputs = self._upstream_contents(unit)
        shards = stage.plan(ctx)
        indices = [s.index for s in shards]
        if sorted(indices) != list(range(len(shards))):
            raise StageError(f"stage {unit.stage!r} planned shard indices {indices[:10]}…; they must be 0..n-1")
        entries: dict[int, dict] = {}
        for p in unit.dir.glob("part-*.parquet"):
            idx = store.shard_index(p.name)
            entry = store.describe_existing_shard(p) if idx is not None and idx < len(shards) else None
            if entry is None:
                p.unlink(missing_ok=True)  # unreadable or not part of this plan
            else:
                entries[idx] = entry
        todo = [s for s in shards if s.index not in entries]
        lost = [n for n in stage.artifacts if not (unit.dir / n).is_file()]
        if shards and not todo and lost:  # killed after its last shard, before an artifact: redo that shard
            last = shards[-1]
            log.info("%s: artifact(s) %s missing: recomputing shard %d", unit.label, ", ".join(lost), last.index)
            (unit.dir / store.shard_name(last.index)).unlink(missing_ok=True)
            entries.pop(last.index)
            todo = [last]
        if entries:
            log.info("%s: resuming — %d of %d shards already done, computing %d", unit.label, len(entries), len(shards), len(todo))
        else:
            log.info("%s: computing %d shard(s) into %s", unit.label, len(todo), unit.dir)
        self._compute_shards(stage, ctx, unit, todo, entries)
        missing = [s.index for s in shards if s.index not in entries]
        if missing:
            raise StageError(f"stage {unit.stage!r} did not produce shard(s) {missing[:10]}; this is a bug in the stage")
        self._write_manifest(unit, stage, ctx, [entries[i] for i in sorted(entries)], inputs, started, time.monotonic() - t0, len(todo))

    def _compute_shards(self, stage: Stage, ctx: StageContext, unit: Unit, todo: list[Shard], entries: dict[int, dict]) -> None:
        if not todo:
            return
        wanted = {s.index for s in todo}
        schema = stage.output_schema(ctx)
        for index, table in stage.compute(ctx, todo):
            if index not in wanted:
                raise StageError(f"stage {unit.stage!r} yielded shard {index}, which was not asked for")
            try:
                table = table.select(schema.names).cast(schema)
            except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError) as err:
                raise StageError(f"stage {unit.stage!r} shard {index} does not match its schema: {err}") from err
            entries[index] = store.write_shard(unit.dir, index, table)
            wanted.discard(index)

    def _write_manifest(self, unit: Unit, stage: Stage, ctx: StageContext, shards: list[dict], inputs: dict,
                        started: str, seconds: float, computed_shards: int) -> None:
        counts = self._counts(unit, stage, shards)
        artifacts = {}
        for name in stage.artifacts:
            path = unit.dir / name
            if not path.is_file():
                raise StageError(f"stage {unit.stage!r} did not write its artifact {name!r}; this is a bug in the stage")
            artifacts[name] = {"bytes": path.stat().st_size, "sha256": store.sha256_file(path)}
        manifest = {
            "stage": unit.stage,
            "version": stage.version,
            "fingerprint": unit.fingerprint,
            "partition": {"kind": unit.partition.kind, "name": unit.partition.name} if unit.partition else None,
            "config": stage.config_for_fingerprint(ctx),
            "inputs": inputs,
            "rows": sum(s["rows"] for s in shards),
            "shards": shards,
            "content": fingerprint([s["sha256"] for s in shards], length=64),
            "counts": counts,
            "artifacts": artifacts,
            "started_at": started,
            "finished_at": _now(),
            "seconds": round(seconds, 3),
            "computed_shards": computed_shards,
            "libraries": _library_versions(),
        }
        store.atomic_write_json(unit.dir / store.MANIFEST, manifest)
        log.info("%s: done — %d rows in %d shard(s), %.1fs", unit.label, manifest["rows"], len(shards), seconds)

    def _counts(self, unit: Unit, stage: Stage, shards: list[dict]) -> dict:
        out: dict[str, dict] = {}
        for col in stage.count_by:
            agg: dict[str, int] = {}
            for entry in shards:
                values = pq.read_table(unit.dir / entry["file"], columns=[col]).column(col)
                for row in pc.value_counts(values).to_pylist():
                    key = str(row["values"])
                    agg[key] = agg.get(key, 0) + row["counts"]
            out[col] = dict(sorted(agg.items()))
        return out

    def _write_stage_manifest(self, name: str) -> None:
        """Publish a per-source stage at its stage-level path: one folder per source, hard links
        to the partitions' shards, and a manifest listing them — a readable Parquet dataset."""
        units = self.units(name)
        manifests = [store.read_manifest(u.dir) for u in units]
        if any(m is None or m.get("fingerprint") != u.fingerprint for m, u in zip(manifests, units)):
            return
        body = {
            "stage": name,
            "fingerprint": self.stage_fingerprint(name),
            "rows": sum(m["rows"] for m in manifests),
            "partitions": [
                {"name": u.partition.name, "kind": u.partition.kind, "fingerprint": u.fingerprint,
                 "unit_dir": str(Path("..") / u.fingerprint), "rows": m["rows"], "content": m["content"],
                 "shards": [f"{u.partition.name}/{e['file']}" for e in m["shards"]]}
                for u, m in zip(units, manifests)
            ],
        }
        links = [(Path(u.partition.name) / e["file"], u.dir / e["file"]) for u, m in zip(units, manifests) for e in m["shards"]]
        store.publish_view(self.stage_dir(name), body, links)

    # ---- read ----------------------------------------------------------------------------
    def read(self, name: str, partition: str | None = None, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """Yield the verified shards of a done stage (optionally one partition's, some columns)."""
        for unit in self.units(name):
            if partition is not None and (unit.partition is None or unit.partition.name != partition):
                continue
            for entry in self._done_manifest(unit, name)["shards"]:
                yield store.read_shard(name, unit.dir, entry, columns)

    def shard_refs(self, name: str, partition: str | None = None) -> list[store.ShardRef]:
        """References to every shard of a done stage (one partition's, if given), for workers to read."""
        refs = []
        for unit in self.units(name):
            if partition is not None and (unit.partition is None or unit.partition.name != partition):
                continue
            manifest = self._done_manifest(unit, name)
            part = unit.partition.name if unit.partition else None
            refs += [store.ShardRef(name, str(unit.dir), e, part) for e in manifest["shards"]]
        return refs

    def artifact_dir(self, name: str, partition: str | None = None) -> Path:
        """The folder holding a done stage's shards and artifacts (e.g. a training export to load from)."""
        unit = next(u for u in self.units(name) if partition is None or (u.partition and u.partition.name == partition))
        self._done_manifest(unit, name)
        return unit.dir

    def read_artifact(self, name: str, artifact: str, partition: str | None = None) -> bytes:
        """An artifact file of a done stage, checksum verified."""
        unit = next(u for u in self.units(name) if partition is None or (u.partition and u.partition.name == partition))
        manifest = self._done_manifest(unit, name)
        data = (unit.dir / artifact).read_bytes()
        if store.sha256_bytes(data) != manifest["artifacts"][artifact]["sha256"]:
            raise store.CorruptShardError(name, unit.dir, artifact, "artifact checksum differs from the manifest")
        return data

    def _done_manifest(self, unit: Unit, name: str) -> dict:
        state, manifest = self._unit_state(unit)
        if state != "done" or manifest is None:
            raise StageError(f"stage {unit.label} is {state}; run `lvd stage {name} --config {self.config.path}` first")
        return manifest

    def kept(self, upto: str, source: str, columns: list[str] | None = None, table: str | None = None) -> Iterator[pa.Table]:
        """Rows of ``source`` kept by every filter upstream of stage ``upto`` (see engine/kept.py):
        of its latest images table, or of ``table`` (another per-image stage, e.g. ``embed``)."""
        from pipeline.engine.kept import kept_rows

        return kept_rows(self, upto, source, columns, table)

    def read_table(self, name: str, partition: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """The whole (verified) output of a stage as one table — small stages and tests only."""
        tables = list(self.read(name, partition, columns))
        if not tables:
            parts = [p for p in self.partitions(name) if p is None or partition in (None, p.name)]
            schema = self.stage(name).output_schema(self.context(name, parts[0] if parts else None))
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(tables)
