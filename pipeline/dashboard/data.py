"""What each dashboard page shows, read from the engine and the run's index (no web code here)."""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.config import Config
from pipeline.dashboard.index import KINDS, SHOW_CLEAR, SHOW_REASONS, RunIndex, ensure_index, index_key
from pipeline.dashboard.tables import find_sorted, shard_path
from pipeline.dashboard.thumbs import ThumbStore
from pipeline.engine import Engine, store

PER_PAGE = 48
CLUSTERS_PER_PAGE = 50
MAP_MAX_POINTS = 5000
ID_RE = re.compile(r"^[0-9a-f]{64}$")
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]
SEVERAL = "#111111"
NONE = "#b0b0b0"
CLUSTER_SORTS = ("cluster", "size", "retrieved", "sources")


class NotFound(LookupError):
    """The page's subject does not exist (a 404)."""


def valid_id(image_id: str) -> bool:
    return bool(ID_RE.match(image_id or ""))


@dataclass
class Page:
    """One page of a list: its rows and where it is."""

    rows: list[dict]
    page: int
    pages: int
    total: int
    per_page: int

    @property
    def first(self) -> int:
        return (self.page - 1) * self.per_page


def page_bounds(total: int, page: int, per_page: int) -> tuple[int, int, int]:
    """(start, stop, pages) of 1-based ``page``; NotFound past the last page."""
    pages = max(1, math.ceil(total / per_page))
    if page < 1 or page > pages:
        raise NotFound(f"page {page} of {pages}")
    start = (page - 1) * per_page
    return start, min(total, start + per_page), pages


class _OneImageReads:
    """The engine as ``pipeline.explain`` sees it, reading only the rows about one image (column
    projections and row filters of the shard files) so a trail never reads the image bytes."""

    def __init__(self, engine: Engine, image_id: str):
        self._engine, self._id = engine, image_id

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def read(self, name: str, partition: str | None = None, columns: list[str] | None = None) -> Iterator[pa.Table]:
        for ref in self._engine.shard_refs(name, partition=partition):
            path = shard_path(ref)
            names = pq.read_schema(path).names
            expr = pc.field("image_id") == self._id
            if "query_id" in names:
                expr = expr | (pc.field("query_id") == self._id)
            yield pq.read_table(path, columns=columns, filters=expr)


class RunData:
    """One run, read-only: the engine (fingerprints computed once), its index, its thumbnails."""

    def __init__(self, config: Config):
        self.config = config
        self.engine = Engine(config, show_progress=False)
        self.root = Path(config.root)
        self.thumbs = ThumbStore(self.root)
        self._index: RunIndex | None = None
        self._signature: tuple | None = None
        self._lock = threading.Lock()

    # ---- the index of the current outputs (rebuilt when a stage's outputs change) -------------
    def _manifests(self) -> tuple:
        """A cheap signature of every unit manifest (stat only): unchanged → the same index."""
        out = []
        for name in self.engine.stage_names():
            for unit in self.engine.units(name):
                try:
                    st = (unit.dir / store.MANIFEST).stat()
                    out.append((st.st_ino, st.st_mtime_ns, st.st_size))
                except FileNotFoundError:
                    out.append(None)
        return tuple(out)

    def index(self) -> RunIndex:
        signature = self._manifests()
        if self._index is not None and signature == self._signature:
            return self._index
        with self._lock:
            key = index_key(self.engine)
            if self._index is None or self._index.key != key:
                self._index = RunIndex(ensure_index(self.engine, key))
            self._signature = signature
        return self._index

    def close(self) -> None:
        self.thumbs.close()

    # ---- images --------------------------------------------------------------------------
    def image_card(self, idx: RunIndex, image_id: str | None, **extra: Any) -> dict:
        """What a thumbnail card needs: id, whether it is shown in clear, why not, its source and kind."""
        if image_id is None:
            return {"id": None, **extra}
        loc = idx.locator
        i = loc.find(image_id)
        if i is None:
            return {"id": image_id, "known": False, "in_clear": False, "why": "not in this run", **extra}
        names = idx.meta.get("source_names", [])
        return {"id": image_id, "known": True, "in_clear": int(loc.show[i]) == SHOW_CLEAR,
                "why": SHOW_REASONS[int(loc.show[i])], "source": names[loc.source[i]] if names else None,
                "kind": KINDS[loc.kind[i]], **extra}

    def prefetch(self, idx: RunIndex, ids: list[str | None]) -> None:
        self.thumbs.prefetch(idx.locator, [i for i in ids if i])

    def thumbnail(self, image_id: str) -> Path | bytes:
        if not valid_id(image_id):
            raise NotFound(image_id)
        got = self.thumbs.get(self.index().locator, image_id)
        if got is None:
            raise NotFound(image_id)
        return got

    # ---- overview and stages -------------------------------------------------------------
    def overview(self) -> dict:
        idx = self.index()
        return {"meta": idx.meta}

    def stage(self, name: str) -> dict:
        if name not in self.engine.registry:
            raise NotFound(name)
        idx = self.index()
        entry = next((s for s in idx.meta["stages"] if s["stage"] == name), None)
        if entry is None:
            raise NotFound(name)
        units = []
        for unit in self.engine.units(name):
            m = store.read_manifest(unit.dir) or {}
            rel = unit.dir.relative_to(self.root) if unit.dir.is_relative_to(self.root) else None
            units.append({"label": unit.label, "fingerprint": unit.fingerprint, "rows": m.get("rows"),
                          "shards": len(m.get("shards") or []), "seconds": m.get("seconds"),
                          "finished_at": m.get("finished_at"), "config": m.get("config"),
                          "manifest": f"{rel}/{store.MANIFEST}" if rel and m else None,
                          "artifacts": [f"{rel}/{a}" for a in (m.get("artifacts") or {})] if rel else []})
        groups = [g for g in idx.meta.get("removed_groups", []) if g["stage"] == name]
        stage = self.engine.stage(name)
        return {"entry": entry, "units": units, "groups": groups, "upstream": list(stage.upstream),
                "per_source": stage.per_source, "meta": idx.meta}

    # ---- clusters ------------------------------------------------------------------------
    def _clusters_or_404(self, idx: RunIndex) -> dict:
        if idx.clusters is None:
            raise NotFound("the cluster stage has not run")
        return idx.clusters

    def source_colors(self, idx: RunIndex) -> dict[str, str]:
        sources = (idx.meta.get("clusters") or {}).get("curated_sources", [])
        return {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sources)}

    def _cluster_row(self, idx: RunIndex, c: dict, k: int) -> dict:
        sources = idx.meta["clusters"]["curated_sources"]
        per = [{"source": s, "retrieved": int(c["by_source"][k, j]), "queries": int(c["queries_in"][k, j])}
               for j, s in enumerate(sources)]
        return {"cluster": k, "size": int(c["size"][k]), "retrieved": int(c["retrieved"][k]),
                "sources": [p for p in per if p["retrieved"] or p["queries"]],
                "hit_by": [p["source"] for p in per if p["retrieved"]]}

    def clusters(self, sort: str = "size", order: str = "desc", page: int = 1) -> tuple[Page, dict]:
        idx = self.index()
        c = self._clusters_or_404(idx)
        if sort not in CLUSTER_SORTS:
            sort = "size"
        desc = order != "asc"
        k = len(c["size"])
        ids = np.arange(k)
        key = {"cluster": ids, "size": c["size"], "retrieved": c["retrieved"],
               "sources": (c["by_source"] > 0).sum(axis=1) if k else ids}[sort]
        # stable: ties by cluster id ascending
        ordered = np.lexsort((ids, -key if desc else key)) if k else ids
        start, stop, pages = page_bounds(k, page, CLUSTERS_PER_PAGE)
        rows = [self._cluster_row(idx, c, int(i)) for i in ordered[start:stop]]
        return Page(rows, page, pages, k, CLUSTERS_PER_PAGE), {"sort": sort, "order": "desc" if desc else "asc",
                                                              "colors": self.source_colors(idx)}

    def cluster(self, cid: int, page: int = 1) -> dict:
        idx = self.index()
        c = self._clusters_or_404(idx)
        if not 0 <= cid < len(c["size"]):
            raise NotFound(f"cluster {cid}")
        lo, hi = int(idx.member_offsets[cid]), int(idx.member_offsets[cid + 1])
        start, stop, pages = page_bounds(hi - lo, page, PER_PAGE)
        members = idx.members.rows(lo + start, lo + stop).to_pylist()
        cards = [self.image_card(idx, m["image_id"], similarity=m["similarity"], retrieved=m["retrieved"],
                                 rank=start + n) for n, m in enumerate(members)]
        self.prefetch(idx, [m["image_id"] for m in members])
        qlo, qhi = int(idx.cluster_query_offsets[cid]), int(idx.cluster_query_offsets[cid + 1])
        queries = idx.cluster_queries.rows(qlo, min(qhi, qlo + PER_PAGE)).to_pylist()
        qcards = [self.image_card(idx, q["query_id"], source=q["query_source"], hits=q["hits"],
                                  best=q["best_similarity"]) for q in queries]
        self.prefetch(idx, [q["query_id"] for q in queries])
        return {"cluster": self._cluster_row(idx, c, cid), "members": Page(cards, page, pages, hi - lo, PER_PAGE),
                "queries": qcards, "more_queries": max(0, (qhi - qlo) - len(queries)),
                "colors": self.source_colors(idx), "count": len(c["size"])}

    def map(self) -> dict:
        idx = self.index()
        c = self._clusters_or_404(idx)
        colors = self.source_colors(idx)
        sources = idx.meta["clusters"]["curated_sources"]
        k = len(c["size"])
        shown = np.lexsort((np.arange(k), -c["size"]))[:MAP_MAX_POINTS] if k else np.arange(0)
        biggest = max(1, int(c["size"].max())) if k else 1
        points = []
        for i in sorted(shown.tolist(), key=lambda j: -int(c["size"][j])):  # big first: small ones on top
            hit = [s for j, s in enumerate(sources) if c["by_source"][i, j] > 0]
            color = NONE if not hit else colors[hit[0]] if len(hit) == 1 else SEVERAL
            x, y = float(c["xy"][i, 0]), float(c["xy"][i, 1])
            points.append({"cluster": i, "x": round(20 + 760 * x, 2), "y": round(20 + 560 * (1 - y), 2),
                           "r": round(3 + 14 * math.sqrt(int(c["size"][i]) / biggest), 2), "color": color,
                           "size": int(c["size"][i]), "retrieved": int(c["retrieved"][i]), "hit_by": hit})
        return {"points": points, "total": k, "shown": len(points), "colors": colors, "several_color": SEVERAL,
                "none_color": NONE, "projection": idx.meta["clusters"].get("projection", "pca")}

    # ---- queries -------------------------------------------------------------------------
    def queries(self, source: str | None = None, page: int = 1) -> tuple[Page, dict]:
        idx = self.index()
        groups = idx.meta.get("query_groups", {})
        if source:
            if source not in groups:
                raise NotFound(f"curated source {source}")
            lo, n = groups[source]["start"], groups[source]["count"]
        else:
            lo, n = 0, idx.queries.num_rows
        start, stop, pages = page_bounds(n, page, PER_PAGE)
        rows = idx.queries.rows(lo + start, lo + stop).to_pylist()
        cards = [self.image_card(idx, r["image_id"], url=r["url"], retrieved=r["retrieved"], cluster=r["cluster"])
                 for r in rows]
        self.prefetch(idx, [r["image_id"] for r in rows])
        return Page(cards, page, pages, n, PER_PAGE), {"groups": groups, "source": source}

    def query(self, image_id: str, page: int = 1) -> dict:
        if not valid_id(image_id):
            raise NotFound(image_id)
        idx = self.index()
        i = idx.locator.find(image_id)
        if i is None or KINDS[idx.locator.kind[i]] != "curated":
            raise NotFound(image_id)
        info = pq.read_table(idx.queries.path, filters=pc.field("image_id") == image_id).to_pylist()
        info = info[0] if info else {"url": None, "retrieved": 0, "cluster": None}
        info.pop("image_id", None)
        total, lo = 0, 0
        if idx.by_query is not None:
            j = find_sorted(idx.query_ids, image_id)
            if j is not None:
                lo, total = int(idx.query_starts[j]), int(idx.query_counts[j])
        start, stop, pages = page_bounds(total, page, PER_PAGE)
        hits = idx.by_query.rows(lo + start, lo + stop).to_pylist() if total else []
        cards = [self.image_card(idx, h["image_id"], rank=h["rank"], similarity=h["similarity"], method=h["method"],
                                 cluster=h["cluster"]) for h in hits]
        self.prefetch(idx, [image_id] + [h["image_id"] for h in hits])
        return {"query": self.image_card(idx, image_id, **info), "hits": Page(cards, page, pages, total, PER_PAGE)}

    # ---- removals and faces --------------------------------------------------------------
    def removed_groups(self) -> list[dict]:
        return self.index().meta.get("removed_groups", [])

    def removed(self, stage: str, reason: str | None, page: int = 1) -> tuple[Page, dict]:
        idx = self.index()
        groups = [g for g in idx.meta.get("removed_groups", []) if g["stage"] == stage
                  and (reason is None or g["reason"] == reason)]
        if not groups:
            if stage in self.engine.registry:
                return Page([], 1, 1, 0, PER_PAGE), {"stage": stage, "reason": reason, "groups": []}
            raise NotFound(f"removals of {stage}/{reason}")
        lo, n = groups[0]["start"], sum(g["count"] for g in groups)  # a stage's reasons are contiguous
        start, stop, pages = page_bounds(n, page, PER_PAGE)
        rows = idx.removed.rows(lo + start, lo + stop).to_pylist()
        cards = []
        for r in rows:
            card = self.image_card(idx, r["image_id"], reason=r["reason"], score=r["score"], url=r["url"],
                                   error=r["error"], stage=r["stage"])
            card["ref"] = self.image_card(idx, r["ref_id"]) if r["ref_id"] else None
            cards.append(card)
        self.prefetch(idx, [r["image_id"] for r in rows] + [r["ref_id"] for r in rows])
        all_groups = [g for g in idx.meta.get("removed_groups", []) if g["stage"] == stage]
        return Page(cards, page, pages, n, PER_PAGE), {"stage": stage, "reason": reason, "groups": all_groups}

    def faces(self, page: int = 1) -> Page:
        idx = self.index()
        start, stop, pages = page_bounds(idx.faces.num_rows, page, PER_PAGE)
        rows = idx.faces.rows(start, stop).to_pylist()
        self.prefetch(idx, [r["image_id"] for r in rows])
        return Page([self.image_card(idx, r["image_id"], faces=r["faces"]) for r in rows], page, pages,
                    idx.faces.num_rows, PER_PAGE)

    # ---- provenance ----------------------------------------------------------------------
    def resolve(self, query: str) -> str:
        """An image id from an id or a URL / file path; NotFound when no source of the run has it."""
        from pipeline.sources import image_id_for

        query = (query or "").strip()
        if not query:
            raise NotFound("empty query")
        image_id = query.lower() if valid_id(query.lower()) else image_id_for(query)
        if self.index().locator.find(image_id) is None:
            raise NotFound(query)
        return image_id

    def trail(self, image_id: str) -> dict:
        from pipeline.explain import explain, format_trail

        if not valid_id(image_id):
            raise NotFound(image_id)
        idx = self.index()
        if idx.locator.find(image_id) is None:
            raise NotFound(image_id)
        trail = explain(_OneImageReads(self.engine, image_id), image_id)  # type: ignore[arg-type]
        refs = {r["ref_id"] for s in trail.values() if isinstance(s, list) for r in s
                if isinstance(r, dict) and r.get("ref_id")}
        self.prefetch(idx, [image_id, *refs])
        return {"trail": trail, "text": format_trail(trail), "card": self.image_card(idx, image_id),
                "refs": {r: self.image_card(idx, r) for r in refs}}
