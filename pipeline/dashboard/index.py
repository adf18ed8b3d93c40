"""Small per-run indexes the dashboard pages read, built once per set of stage outputs.

``<root>/dashboard/cache/<key>/`` where ``key`` hashes every stage's fingerprint, state and
content digest (a recomputed or changed stage gives a new key, so an index is never stale). The
directory is built under a temporary name and renamed into place. It holds:

- ``meta.json``: the overview (funnel, counts per source, model, fingerprints) and page groups;
- ``locator.npz``: every ingested image id (sorted) → the shard and row of the bytes the
  dashboard may show, or why it shows a grey placeholder instead (NSFW removed or unscreened,
  no bytes). Uncurated images are shown only from ``face_blur``'s blurred bytes, and only once
  ``nsfw`` kept them;
- ``clusters.npz`` and ``members.parquet``: per cluster its size, what was retrieved from it (by
  which curated source), its 2-D map position; members sorted by cosine to the centroid;
- ``by_query.parquet``, ``cluster_queries.parquet``, ``queries.parquet``: retrieval rows by query,
  queries by cluster, the curated images;
- ``removed.parquet``, ``faces.parquet``: removals by stage and reason, images with blurred faces.

Parquet index files have small row groups: a page reads one or two of them, never a whole table.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dashboard.tables import (
    ID_DTYPE, RowReader, find_sorted, id_array, is_done, read_stage_table, shard_path, write_parquet,
)
from pipeline.engine import Engine, store
from pipeline.engine.fingerprint import fingerprint
from pipeline.engine.kept import images_stage

log = logging.getLogger("lvd")

INDEX_VERSION = 1
SAFETY_STAGE = "nsfw"      # uncurated images are shown in clear only once this stage kept them
LAST_STAGE = "dataset"     # the images shown are the latest images table upstream of it

# Why an image is (not) shown in clear: locator ``show`` codes.
SHOW_CLEAR, SHOW_NSFW, SHOW_UNSCREENED, SHOW_NO_BYTES, SHOW_NOT_YET = 0, 1, 2, 3, 4
SHOW_REASONS = {
    SHOW_CLEAR: "",
    SHOW_NSFW: "removed as NSFW: never shown",
    SHOW_UNSCREENED: "not screened for NSFW yet: not shown",
    SHOW_NO_BYTES: "no image bytes (the fetch or decode failed)",
    SHOW_NOT_YET: "its display stage has not run yet",
}
KINDS = ("uncurated", "curated", "eval")


def cache_root(engine: Engine) -> Path:
    return engine.config.root / "dashboard" / "cache"


def index_key(engine: Engine) -> str:
    """Hash of every stage's fingerprint, state and output content, plus this module's version."""
    parts = []
    for st in engine.status_all():
        contents = []
        if st.state == "done":
            for unit in engine.units(st.stage):
                m = store.read_manifest(unit.dir) or {}
                contents.append(m.get("content"))
        parts.append([st.stage, st.state, st.fingerprint, contents])
    return fingerprint({"version": INDEX_VERSION, "stages": parts})


def _atomic_dir(final: Path, build) -> None:
    """Run ``build(tmp_dir)`` and rename the directory into place (another builder may win)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{store.TMP_PREFIX}{uuid.uuid4().hex[:8]}-{final.name}")
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "meta.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure_index(engine: Engine, key: str | None = None) -> Path:
    """The index directory of the run's current outputs (``key``: its ``index_key``), built if missing."""
    key = key or index_key(engine)
    final = cache_root(engine) / key
    if not (final / "meta.json").is_file():
        log.info("dashboard: indexing %s", engine.config.root)
        _atomic_dir(final, lambda tmp: IndexBuilder(engine, tmp).build())
    return final


# ---- building --------------------------------------------------------------------------
class IndexBuilder:
    """Builds one index directory from the done stages of a run (every missing stage is skipped)."""

    def __init__(self, engine: Engine, out: Path):
        self.engine, self.out = engine, out
        self.sources = [(kind, src.name) for kind, src in engine.config.sources.all()]
        self.curated = [name for kind, name in self.sources if kind == "curated"]
        self.meta: dict[str, Any] = {"version": INDEX_VERSION, "root": str(engine.config.root),
                                     "config": str(engine.config.path), "name": engine.config.name}
        self._query_cluster: dict[str, int] = {}

    def done(self, stage: str) -> bool:
        return is_done(self.engine, stage)

    def build(self) -> None:
        ingest = self._ingest()
        self._locator(ingest)
        removed = self._removed(ingest)
        retrieval = self._retrieval()
        self._clusters(retrieval)
        self._queries(ingest, retrieval)
        self._faces()
        self._overview(ingest, removed, retrieval)
        (self.out / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True, default=str))

    # -- ingest: every image of every source (no bytes)
    def _ingest(self) -> pa.Table:
        cols = ["image_id", "url", "source", "kind", "status", "error"]
        if not self.done("ingest"):
            return pa.schema([self.engine.stage("ingest").schema.field(c) for c in cols]).empty_table()
        return read_stage_table(self.engine, "ingest", cols).sort_by("image_id")

    # -- where each image's displayable bytes are
    def _locator(self, ingest: pa.Table) -> None:
        ids = id_array(ingest["image_id"])
        n = len(ids)
        show = np.full(n, SHOW_NO_BYTES, np.int8)
        shard = np.full(n, -1, np.int32)
        row = np.full(n, -1, np.int32)
        kind_codes = np.array([KINDS.index(k) for k in ingest["kind"].to_pylist()], np.int8)
        source_names = [name for _, name in self.sources]
        source_codes = np.array([source_names.index(s) for s in ingest["source"].to_pylist()], np.int16)
        ok = np.array([s == "ok" for s in ingest["status"].to_pylist()], bool)
        show[ok] = SHOW_NOT_YET
        shards: list[str] = []
        units: list[str] = []
        screened = self._screened()
        for kind, name in self.sources:
            stage = images_stage(self.engine, LAST_STAGE, kind) if LAST_STAGE in self.engine.registry else "ingest"
            screen = SAFETY_STAGE in self.engine.registry and kind in self.engine.stage(SAFETY_STAGE).kinds
            if not self._partition_done(stage, name):
                continue
            for ref in self.engine.shard_refs(stage, partition=name):
                path = shard_path(ref)
                t = pq.read_table(path, columns=["image_id", "status"])
                rows = np.flatnonzero(np.array([s == "ok" for s in t["status"].to_pylist()], bool))
                want = id_array(t["image_id"].take(pa.array(rows, pa.int64())))
                pos = np.minimum(np.searchsorted(ids, want), max(n - 1, 0))
                known = (ids[pos] == want) if n else np.zeros(len(want), bool)
                pos, rows = pos[known], rows[known]
                shards.append(str(path))
                units.append(Path(ref.unit_dir).name)
                shard[pos], row[pos] = len(shards) - 1, rows
                if not screen:
                    show[pos] = SHOW_CLEAR
                elif screened is None:
                    show[pos] = SHOW_UNSCREENED
                else:
                    kept = np.isin(ids[pos], screened["kept"])
                    show[pos] = np.where(kept, SHOW_CLEAR, np.where(np.isin(ids[pos], screened["removed"]),
                                                                    SHOW_NSFW, SHOW_UNSCREENED))
        # an image removed as NSFW is never shown, whatever table would hold its bytes
        if screened is not None:
            show[np.isin(ids, screened["removed"])] = SHOW_NSFW
        np.savez(self.out / "locator.npz", ids=ids, show=show, shard=shard, row=row, kind=kind_codes,
                 source=source_codes, shards=np.array(shards, dtype=object).astype(str),
                 units=np.array(units, dtype=object).astype(str))
        self.meta["source_names"] = source_names

    def _partition_done(self, stage: str, source: str) -> bool:
        for unit in self.engine.units(stage):
            if unit.partition is None or unit.partition.name == source:
                m = store.read_manifest(unit.dir)
                if m is None or m.get("fingerprint") != unit.fingerprint:
                    return False
        return True

    def _screened(self) -> dict[str, np.ndarray] | None:
        if SAFETY_STAGE not in self.engine.registry or not self.done(SAFETY_STAGE):
            return None
        t = read_stage_table(self.engine, SAFETY_STAGE, ["image_id", "decision"])
        removed = pc.equal(t["decision"], "removed")
        return {"kept": np.sort(id_array(t["image_id"].filter(pc.invert(removed)))),
                "removed": np.sort(id_array(t["image_id"].filter(removed)))}

    # -- removals: failed fetches and every decisions stage's removed rows, by stage and reason
    def _removed(self, ingest: pa.Table) -> pa.Table:
        schema = pa.schema([("stage", pa.string()), ("reason", pa.string()), ("image_id", pa.string()),
                            ("source", pa.string()), ("url", pa.string()), ("score", pa.float64()),
                            ("ref_id", pa.string()), ("error", pa.string())])
        parts = []
        failed = ingest.filter(pc.not_equal(ingest["status"], "ok"))
        if failed.num_rows:
            parts.append(pa.table({
                "stage": pa.array(["ingest"] * failed.num_rows, pa.string()), "reason": failed["status"],
                "image_id": failed["image_id"], "source": failed["source"], "url": failed["url"],
                "score": pa.nulls(failed.num_rows, pa.float64()), "ref_id": pa.nulls(failed.num_rows, pa.string()),
                "error": failed["error"]}, schema=schema))
        urls = ingest.select(["image_id", "url"])
        order = self.engine.stage_names()
        for stage in order:
            if self.engine.stage(stage).output != "decisions" or not self.done(stage):
                continue
            t = read_stage_table(self.engine, stage, ["image_id", "source", "decision", "reason", "score", "ref_id"])
            t = t.filter(pc.equal(t["decision"], "removed"))
            if not t.num_rows:
                continue
            url = urls["url"].take(pc.index_in(t["image_id"], urls["image_id"])) if urls.num_rows else \
                pa.nulls(t.num_rows, pa.string())
            parts.append(pa.table({
                "stage": pa.array([stage] * t.num_rows, pa.string()),
                "reason": pc.fill_null(t["reason"], "removed"), "image_id": t["image_id"], "source": t["source"],
                "url": url, "score": t["score"], "ref_id": t["ref_id"],
                "error": pa.nulls(t.num_rows, pa.string())}, schema=schema))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        rank = pa.array([order.index(s) for s in table["stage"].to_pylist()], pa.int32())
        table = table.append_column("_order", rank).sort_by(
            [("_order", "ascending"), ("reason", "ascending"), ("image_id", "ascending")]).drop_columns(["_order"])
        write_parquet(table, self.out / "removed.parquet")
        groups, start = [], 0
        for (stage, reason), count in _runs(list(zip(table["stage"].to_pylist(), table["reason"].to_pylist()))):
            groups.append({"stage": stage, "reason": reason, "start": start, "count": count})
            start += count
        self.meta["removed_groups"] = groups
        return table

    # -- retrieval rows, each with the cluster its image belongs to
    def _retrieval(self) -> pa.Table | None:
        if not (self.done("retrieve") and self.done("cluster")):
            return None
        r = read_stage_table(self.engine, "retrieve", ["image_id", "source", "query_source", "query_id", "rank",
                                                       "similarity", "method"])
        c = read_stage_table(self.engine, "cluster", ["image_id", "cluster"])
        cluster = c["cluster"].take(pc.index_in(r["image_id"], c["image_id"]))
        return r.append_column("cluster", cluster)

    # -- clusters: sizes, what was retrieved from each and by which source, members, the map
    def _clusters(self, retrieval: pa.Table | None) -> None:
        if not self.done("cluster"):
            self.meta["clusters"] = None
            return
        from pipeline.stages.cluster import load_centroids

        c = read_stage_table(self.engine, "cluster", ["image_id", "source", "cluster", "similarity"])
        centroids = load_centroids(self.engine.read_artifact("cluster", "centroids.npz"))
        level0 = centroids[0] if centroids else np.zeros((0, 0), np.float32)
        k = len(level0)
        assign = c["cluster"].to_numpy(zero_copy_only=False).astype(np.int64)
        size = np.bincount(assign, minlength=k)[:k] if k else np.zeros(0, np.int64)
        sources = self.curated
        retrieved = np.zeros(k, np.int64)
        by_source = np.zeros((k, len(sources)), np.int64)
        retrieved_ids: set[str] = set()
        if retrieval is not None and retrieval.num_rows:
            ids = retrieval["image_id"].to_pylist()
            clus = retrieval["cluster"].to_pylist()
            qsrc = retrieval["query_source"].to_pylist()
            retrieved_ids = set(ids)
            for cl, n in Counter(cl for cl, _ in set(zip(clus, ids)) if cl is not None).items():
                retrieved[cl] = n
            for (cl, s), n in Counter((cl, s) for cl, s, _ in set(zip(clus, qsrc, ids)) if cl is not None).items():
                if s in sources:
                    by_source[cl, sources.index(s)] = n
        queries_in = np.zeros((k, len(sources)), np.int64)
        if k and self.done("embed"):
            queries_in = self._queries_per_cluster(level0)
        xy, projection = project_2d(level0)
        np.savez(self.out / "clusters.npz", size=size, retrieved=retrieved, by_source=by_source,
                 queries_in=queries_in, xy=xy, levels=np.array([len(x) for x in centroids], np.int64))
        self.meta["clusters"] = {"count": k, "curated_sources": sources, "levels": [len(x) for x in centroids],
                                 "projection": projection}
        members = c.append_column("retrieved", pc.is_in(c["image_id"], pa.array(sorted(retrieved_ids), pa.string())))
        members = members.sort_by([("cluster", "ascending"), ("similarity", "descending"), ("image_id", "ascending")])
        write_parquet(members, self.out / "members.parquet")
        offsets = np.searchsorted(members["cluster"].to_numpy(zero_copy_only=False), np.arange(k + 1))
        np.save(self.out / "member_offsets.npy", offsets.astype(np.int64))
        self._cluster_queries(retrieval, k)

    def _queries_per_cluster(self, level0: np.ndarray) -> np.ndarray:
        """How many of each curated source's images fall in each cluster (nearest centroid)."""
        from pipeline.vectors.kmeans import assign_to

        out = np.zeros((len(level0), len(self.curated)), np.int64)
        for j, name in enumerate(self.curated):
            t = read_stage_table(self.engine, "embed", ["image_id", "embedding"], partition=name)
            t = t.filter(pc.is_valid(t["embedding"]))
            if not t.num_rows:
                continue
            emb = t["embedding"].combine_chunks()
            x = emb.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(t.num_rows, -1)
            x /= np.linalg.norm(x, axis=1, keepdims=True).clip(min=1e-12)
            a, _ = assign_to(level0.astype(np.float32), x, gpu=False)
            out[:, j] = np.bincount(a, minlength=len(level0))[:len(level0)]
            self._query_cluster.update(zip(t["image_id"].to_pylist(), a.tolist()))
        return out

    def _cluster_queries(self, retrieval: pa.Table | None, k: int) -> None:
        """Per cluster, the queries that retrieved from it: (query_source, query_id, hits, best similarity)."""
        schema = pa.schema([("cluster", pa.int32()), ("query_source", pa.string()), ("query_id", pa.string()),
                            ("hits", pa.int64()), ("best_similarity", pa.float32())])
        table = schema.empty_table()
        if retrieval is not None and retrieval.num_rows:
            r = retrieval.filter(pc.is_valid(retrieval["cluster"]))
            g = r.group_by(["cluster", "query_source", "query_id"], use_threads=False).aggregate(
                [("image_id", "count_distinct"), ("similarity", "max")])
            table = pa.table({"cluster": g["cluster"].cast(pa.int32()), "query_source": g["query_source"],
                              "query_id": g["query_id"], "hits": g["image_id_count_distinct"],
                              "best_similarity": g["similarity_max"].cast(pa.float32())}, schema=schema)
            table = table.sort_by([("cluster", "ascending"), ("hits", "descending"), ("query_id", "ascending")])
        write_parquet(table, self.out / "cluster_queries.parquet")
        offsets = np.searchsorted(table["cluster"].to_numpy(zero_copy_only=False), np.arange(k + 1))
        np.save(self.out / "cluster_query_offsets.npy", offsets.astype(np.int64))

    # -- curated queries and, per query, what it retrieved
    def _queries(self, ingest: pa.Table, retrieval: pa.Table | None) -> None:
        counts: Counter[str] = Counter()
        if retrieval is not None and retrieval.num_rows:
            r = retrieval.filter(pc.is_valid(retrieval["query_id"]))
            r = r.sort_by([("query_id", "ascending"), ("rank", "ascending"), ("image_id", "ascending")])
            counts.update(r["query_id"].to_pylist())
        else:
            r = None
        if r is not None:
            write_parquet(r, self.out / "by_query.parquet")
            qids = np.array(sorted(counts), dtype=object)
            starts = np.searchsorted(id_array(r["query_id"]), id_array(list(qids))) if len(qids) else np.zeros(0)
            np.savez(self.out / "by_query_index.npz", ids=id_array(list(qids)),
                     starts=np.asarray(starts, np.int64), counts=np.array([counts[q] for q in qids], np.int64))
        cur = ingest.filter(pc.and_(pc.equal(ingest["kind"], "curated"), pc.equal(ingest["status"], "ok")))
        cur = cur.sort_by([("source", "ascending"), ("image_id", "ascending")])
        qcluster = self._query_cluster
        ids = cur["image_id"].to_pylist()
        table = pa.table({"image_id": cur["image_id"], "source": cur["source"], "url": cur["url"],
                          "retrieved": pa.array([counts.get(i, 0) for i in ids], pa.int64()),
                          "cluster": pa.array([qcluster.get(i) for i in ids], pa.int32())})
        write_parquet(table, self.out / "queries.parquet")
        groups, start = {}, 0
        for name, n in _runs(table["source"].to_pylist()):
            groups[name] = {"start": start, "count": n}
            start += n
        self.meta["query_groups"] = groups
        self.meta["retrieval"] = None if retrieval is None else {
            "rows": retrieval.num_rows, "images": len(set(retrieval["image_id"].to_pylist())),
            "by_source": dict(Counter(retrieval["query_source"].to_pylist())),
            "methods": dict(Counter(retrieval["method"].to_pylist()))}

    # -- images whose faces were blurred
    def _faces(self) -> None:
        schema = pa.schema([("image_id", pa.string()), ("source", pa.string()), ("faces", pa.int32())])
        table = schema.empty_table()
        if "face_blur" in self.engine.registry and self.done("face_blur"):
            t = read_stage_table(self.engine, "face_blur", ["image_id", "source", "faces"])
            t = t.filter(pc.greater(pc.fill_null(t["faces"], 0), 0)).cast(schema)
            table = t.sort_by([("faces", "descending"), ("image_id", "ascending")])
        write_parquet(table, self.out / "faces.parquet")
        self.meta["faces"] = table.num_rows

    # -- the overview: per stage in/kept/removed, per source counts, the uncurated funnel
    def _overview(self, ingest: pa.Table, removed: pa.Table, retrieval: pa.Table | None) -> None:
        eng = self.engine
        stages = []
        removed_by = Counter(zip(removed["stage"].to_pylist(), removed["reason"].to_pylist()))
        for st in eng.status_all():
            stage = eng.stage(st.stage)
            entry = {"stage": st.stage, "state": st.state, "fingerprint": st.fingerprint, "rows": st.rows,
                     "seconds": st.seconds, "description": stage.description, "output": stage.output,
                     "in": st.rows, "kept": st.rows, "removed": {}, "notes": []}
            counts = st.counts or {}
            if st.state == "done":
                reasons = {r: n for (s, r), n in sorted(removed_by.items()) if s == st.stage}
                if st.stage == "ingest" or stage.output == "decisions":
                    entry["removed"] = reasons
                    entry["kept"] = (st.rows or 0) - sum(reasons.values())
                for col, vc in counts.items():
                    if col not in ("decision", "reason", "status"):
                        entry["notes"].append(f"by {col}: " + ", ".join(f"{k}={v}" for k, v in sorted(
                            vc.items(), key=lambda kv: -kv[1])))
                if st.stage == "cluster" and self.meta.get("clusters"):
                    entry["notes"].insert(0, f"{self.meta['clusters']['count']} clusters")
                if st.stage == "retrieve" and retrieval is not None:
                    pool = eng.status("cluster").rows
                    entry["in"], entry["kept"] = pool, self.meta["retrieval"]["images"]
                    entry["notes"].insert(0, f"{retrieval.num_rows} hits on {entry['kept']} distinct images")
            stages.append(entry)
        self.meta["stages"] = stages
        self.meta["per_source"] = self._per_source(ingest, removed, retrieval)
        self.meta["funnel"] = self._funnel(ingest, removed)
        self.meta["embedding"] = self._embedding()
        self.meta["dataset"] = json.loads(eng.read_artifact("dataset", "summary.json")) \
            if "dataset" in eng.registry and self.done("dataset") else None
        if self.meta["dataset"] is not None:
            unit = eng.units("dataset")[0]
            self.meta["dataset_files"] = [str((unit.dir / n).relative_to(eng.config.root))
                                          for n in eng.stage("dataset").artifacts]

    def _per_source(self, ingest: pa.Table, removed: pa.Table, retrieval: pa.Table | None) -> list[dict]:
        status = Counter(zip(ingest["source"].to_pylist(), ingest["status"].to_pylist()))
        gone = Counter(zip(removed["source"].to_pylist(), removed["stage"].to_pylist()))
        retrieved = Counter(s for s, _ in set(zip(retrieval["source"].to_pylist(), retrieval["image_id"].to_pylist()))) \
            if retrieval is not None else Counter()
        ds = self.engine.status(LAST_STAGE) if LAST_STAGE in self.engine.registry else None
        in_dataset = (ds.counts or {}).get("source", {}) if ds is not None and ds.state == "done" else {}
        out = []
        for kind, name in self.sources:
            inputs = sum(n for (s, _), n in status.items() if s == name)
            out.append({"source": name, "kind": kind, "inputs": inputs, "ok": status.get((name, "ok"), 0),
                        "removed": {st: n for (s, st), n in gone.items() if s == name and st != "ingest"},
                        "retrieved": retrieved.get(name, 0) if kind == "uncurated" else None,
                        "in_dataset": in_dataset.get(name)})
        return out

    def _funnel(self, ingest: pa.Table, removed: pa.Table) -> list[dict]:
        """Per uncurated source: ok images, then what remains after each filter in DAG order."""
        out = []
        decision_stages = [s for s in self.engine.stage_names() if self.engine.stage(s).output == "decisions"]
        for kind, name in self.sources:
            if kind != "uncurated":
                continue
            ok = ingest.filter(pc.and_(pc.equal(ingest["source"], name), pc.equal(ingest["status"], "ok")))
            alive = np.sort(id_array(ok["image_id"]))
            steps = [{"stage": "ingest", "remaining": len(alive), "newly_removed": 0, "done": self.done("ingest")}]
            mine = removed.filter(pc.equal(removed["source"], name))
            for stage in decision_stages:
                gone = id_array(mine.filter(pc.equal(mine["stage"], stage))["image_id"])
                before = len(alive)
                alive = alive[~np.isin(alive, gone)]
                steps.append({"stage": stage, "remaining": len(alive), "newly_removed": before - len(alive),
                              "done": self.done(stage)})
            if self.meta.get("retrieval") is not None:
                steps.append({"stage": "retrieve", "remaining": None, "newly_removed": 0, "done": True})
            out.append({"source": name, "steps": steps})
        return out

    def _embedding(self) -> dict:
        spec = self.engine.config.embed.model
        models: list[str] = []
        if "embed" in self.engine.registry and self.done("embed"):
            t = read_stage_table(self.engine, "embed", ["model"])
            models = sorted({m for m in t["model"].to_pylist() if m})
        return {"config": spec, "models": models, "random_weights": spec.strip().lower().endswith(":none")}


def _runs(values: list) -> list[tuple[Any, int]]:
    """Consecutive runs of equal values: [(value, length), ...]."""
    out: list[tuple[Any, int]] = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1] = (v, out[-1][1] + 1)
        else:
            out.append((v, 1))
    return out


def project_2d(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D positions in [0, 1]² of unit vectors: UMAP (cosine) when umap-learn is installed and there are
    enough points, else the top two principal components."""
    n = len(x)
    if n == 0:
        return np.zeros((0, 2), np.float32), "pca"
    xy, method = None, "pca"
    if 16 <= n <= 50_000:
        try:
            import umap  # type: ignore[import-not-found]

            xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed,
                           n_neighbors=min(15, n - 1)).fit_transform(x)
            method = "umap"
        except ImportError:
            xy = None
    if xy is None:
        centred = x.astype(np.float64) - x.mean(axis=0, keepdims=True)
        if n > 1 and np.abs(centred).max() > 0:
            _, _, vt = np.linalg.svd(centred, full_matrices=False)
            comps = vt[:2]
            xy = centred @ comps.T
            if xy.shape[1] < 2:
                xy = np.hstack([xy, np.zeros((n, 2 - xy.shape[1]))])
            # a deterministic orientation: the largest-|coordinate| point of each axis is positive
            for j in range(2):
                if xy[np.argmax(np.abs(xy[:, j])), j] < 0:
                    xy[:, j] = -xy[:, j]
        else:
            xy = np.zeros((n, 2))
    xy = np.asarray(xy, np.float64)
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    return ((xy - lo) / span).astype(np.float32), method


# ---- loading ---------------------------------------------------------------------------
@dataclass
class Locator:
    ids: np.ndarray
    show: np.ndarray
    shard: np.ndarray
    row: np.ndarray
    kind: np.ndarray
    source: np.ndarray
    shards: list[str]
    units: list[str]

    def find(self, image_id: str) -> int | None:
        return find_sorted(self.ids, image_id)


class RunIndex:
    """A built index directory, loaded: small arrays in memory, Parquet files read by row range."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.key = self.dir.name
        self.meta = json.loads((self.dir / "meta.json").read_text())
        z = np.load(self.dir / "locator.npz")
        self.locator = Locator(z["ids"].astype(ID_DTYPE), z["show"], z["shard"], z["row"], z["kind"], z["source"],
                               [str(s) for s in z["shards"]], [str(u) for u in z["units"]])
        self.removed = RowReader(self.dir / "removed.parquet")
        self.queries = RowReader(self.dir / "queries.parquet")
        self.faces = RowReader(self.dir / "faces.parquet")
        self.clusters = None
        if self.meta.get("clusters") is not None:
            c = np.load(self.dir / "clusters.npz")
            self.clusters = {k: c[k] for k in c.files}
            self.members = RowReader(self.dir / "members.parquet")
            self.member_offsets = np.load(self.dir / "member_offsets.npy")
            self.cluster_queries = RowReader(self.dir / "cluster_queries.parquet")
            self.cluster_query_offsets = np.load(self.dir / "cluster_query_offsets.npy")
        self.by_query = None
        if (self.dir / "by_query.parquet").is_file():
            self.by_query = RowReader(self.dir / "by_query.parquet")
            q = np.load(self.dir / "by_query_index.npz")
            self.query_ids, self.query_starts, self.query_counts = q["ids"].astype(ID_DTYPE), q["starts"], q["counts"]
