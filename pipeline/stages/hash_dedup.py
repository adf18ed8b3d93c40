"""`hash_dedup`: exact duplicates (same stored sha256), then PCA-hash (or pHash) near-duplicates.

A combining stage over every uncurated source: hashes are computed on Ray Data, the PCA is fitted
on a uniform sample (the smallest image_ids), near-duplicate pairs come from a FAISS binary index
range search (Hamming distance <= radius), groups are connected components, and each group keeps
one image (largest area, then smallest image_id). Output: one decisions row per ok uncurated image.
"""
from __future__ import annotations

import io
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.hashing import codes_batch, fit_pca, hamming, pca_hash, thumbnails_batch
from pipeline.neardup import group, near_duplicate_pairs, representatives
from pipeline.raydata import RAY_ONLY, ensure_ray, map_shards
from pipeline.tables import DECISIONS_SCHEMA

CATALOG_COLUMNS = ["image_id", "source", "status", "sha256", "width", "height"]


@register
class HashDedup(Stage):
    name = "hash_dedup"
    version = 1
    upstream = ("ingest",)
    section = "hash_dedup"
    kinds = ("uncurated",)
    schema = DECISIONS_SCHEMA
    output = "decisions"
    count_by = ("decision", "reason")
    artifacts = ("hash_model.npz",)
    fingerprint_exclude = RAY_ONLY
    description = "exact and PCA-hash near-duplicate removal (FAISS binary index, Hamming radius)"

    def _inputs(self, ctx: StageContext) -> list:
        return [ref for kind, src in ctx.config.sources.all() if kind == "uncurated"
                for ref in ctx.engine.shard_refs("ingest", partition=src.name)]

    def _catalog(self, ctx: StageContext) -> pa.Table:
        """id, source, sha256 and size of every ok uncurated image, sorted by image_id (read once per unit
        run: plan and compute both need it, and reading verifies every ingest shard's checksum)."""
        if "catalog" not in ctx.memo:
            ctx.memo["catalog"] = self._read_catalog(ctx)
        return ctx.memo["catalog"]

    def _read_catalog(self, ctx: StageContext) -> pa.Table:
        tables = [ref.read(CATALOG_COLUMNS) for ref in self._inputs(ctx)]
        if not tables:
            return pa.table({c: [] for c in CATALOG_COLUMNS})
        t = pa.concat_tables(tables)
        t = t.filter(pc.equal(t["status"], "ok"))
        return t.sort_by("image_id")

    def plan(self, ctx: StageContext) -> list[Shard]:
        ids = self._catalog(ctx)["image_id"].to_pylist()
        n = ctx.config.engine.shard_rows
        return [Shard(i, (ids[k], ids[min(k + n, len(ids)) - 1])) for i, k in enumerate(range(0, len(ids), n))] \
            or [Shard(0, None)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        cat = self._catalog(ctx)
        if cat.num_rows:
            decisions = self._decide(ctx, cat)
        else:  # nothing decodable to hash (every fetch failed): an empty model, so the stage still completes
            decisions = DECISIONS_SCHEMA.empty_table()
            ctx.write_artifact("hash_model.npz", _model_bytes(ctx.section.method, ctx.section.thumb_size, None, None))
        ids = decisions["image_id"]
        for shard in shards:
            if shard.payload is None:
                yield shard.index, DECISIONS_SCHEMA.empty_table()
                continue
            lo, hi = shard.payload
            mask = pc.and_(pc.greater_equal(ids, lo), pc.less_equal(ids, hi))
            yield shard.index, decisions.filter(mask)

    def _decide(self, ctx: StageContext, cat: pa.Table) -> pa.Table:
        cfg = ctx.section
        ids = np.array(cat["image_id"].to_pylist(), dtype=object)
        area = (pc.multiply(cat["width"].cast(pa.int64()), cat["height"].cast(pa.int64()))).to_numpy()
        _, exact_group = np.unique(np.array(cat["sha256"].to_pylist(), dtype=object), return_inverse=True)
        order = np.arange(len(ids))  # the catalog is sorted by image_id: position orders ids
        exact_rep = representatives(exact_group, area, order)
        codes = self._codes(ctx, cat)
        final_rep = exact_rep.copy()
        uniq = np.flatnonzero((exact_rep == np.arange(len(ids))) & codes["valid"])
        if len(uniq) > 1:
            i, j, _ = near_duplicate_pairs(codes["codes"][uniq], cfg.radius, cfg.index, cfg.flat_max)
            near_rep = uniq[representatives(group(len(uniq), i, j), area[uniq], order[uniq])]
            rep_of_uniq = np.arange(len(ids))
            rep_of_uniq[uniq] = near_rep
            final_rep = rep_of_uniq[exact_rep]
        dist = hamming(codes["codes"], codes["codes"][final_rep])
        return self._rows(cat, ids, final_rep, exact_rep, dist)

    def _rows(self, cat: pa.Table, ids: np.ndarray, rep: np.ndarray, exact_rep: np.ndarray,
              dist: np.ndarray) -> pa.Table:
        n = len(ids)
        removed = rep != np.arange(n)
        exact = removed & (rep == exact_rep)
        reason = np.where(exact, "exact_duplicate", np.where(removed, "near_duplicate", None))
        return pa.table({
            "image_id": cat["image_id"], "source": cat["source"],
            "stage": pa.array([self.name] * n, pa.string()),
            "decision": pa.array(np.where(removed, "removed", "kept").tolist(), pa.string()),
            "reason": pa.array(reason.tolist(), pa.string()),
            "score": pa.array(dist.astype(np.float64), pa.float64(), mask=~removed),
            "ref_id": pa.array([ids[r] if rm else None for r, rm in zip(rep, removed)], pa.string()),
        }, schema=DECISIONS_SCHEMA)

    def _codes(self, ctx: StageContext, cat: pa.Table) -> dict:
        """Hash codes of every catalog row (aligned), and which rows could be hashed."""
        cfg = ctx.section
        ensure_ray(ctx.config)
        refs = [(i, ref) for i, ref in enumerate(self._inputs(ctx))]
        mean = comps = None
        by_id: dict[str, bytes | None] = {}
        if cfg.method == "pca":
            ids = cat["image_id"].to_pylist()
            sample = frozenset(ids[: cfg.pca_sample])  # ids are hashes: a uniform sample
            thumb_schema = pa.schema([("image_id", pa.string()), ("thumb", pa.binary())])
            got = [t for _, t in map_shards(refs, thumbnails_batch, cfg, thumb_schema, columns=["image_id", "image"],
                                            only_ok=True, fn_kwargs={"size": cfg.thumb_size, "wanted": sample})]
            thumbs = pa.concat_tables(got).sort_by("image_id")
            matrix = np.stack([np.frombuffer(t, np.uint8) for t in thumbs["thumb"].to_pylist()])
            mean, comps = fit_pca(matrix, cfg.bits)
            if len(sample) == len(ids):  # the sample is everything: hash it here, no second decoding pass
                by_id = dict(zip(thumbs["image_id"].to_pylist(), (c.tobytes() for c in pca_hash(matrix, mean, comps))))
        ctx.write_artifact("hash_model.npz", _model_bytes(cfg.method, cfg.thumb_size, mean, comps))
        if not by_id:
            code_schema = pa.schema([("image_id", pa.string()), ("code", pa.binary())])
            got = [t for _, t in map_shards(refs, codes_batch, cfg, code_schema, columns=["image_id", "image"],
                                            only_ok=True, fn_kwargs={"method": cfg.method, "size": cfg.thumb_size,
                                                                     "mean": mean, "comps": comps})]
            table = pa.concat_tables(got)
            by_id = dict(zip(table["image_id"].to_pylist(), table["code"].to_pylist()))
        nbytes = (64 if cfg.method == "phash" else cfg.bits) // 8
        blank = bytes(nbytes)
        raw = [by_id.get(i) for i in cat["image_id"].to_pylist()]
        codes = np.frombuffer(b"".join(r or blank for r in raw), np.uint8).reshape(len(raw), nbytes)
        return {"codes": codes, "valid": np.array([r is not None for r in raw])}


def _model_bytes(method: str, size: int, mean: np.ndarray | None, comps: np.ndarray | None) -> bytes:
    """The fitted hash (method, thumbnail size, PCA mean and components) as a deterministic .npz."""
    buf = io.BytesIO()
    arrays = {"method": np.array(method), "thumb_size": np.array(size)}
    if mean is not None:
        arrays.update(mean=mean, components=comps)
    np.savez(buf, **arrays)
    return buf.getvalue()
