"""copy_dedup, cluster and retrieve as engine stages, on synthetic embeddings with planted structure.

The real stages run; `embed` (and the two filters copy_dedup reads) are replaced in a test
registry by stand-ins that emit planted vectors, so the test knows exactly what must be found.
"""
from __future__ import annotations

import hashlib
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import parse_config
from pipeline.engine import REGISTRY, Engine, Shard, Stage, StageContext, register
from pipeline.engine.stage import load_builtin_stages
from pipeline.tables import DECISIONS_SCHEMA, embeddings_schema

D = 128
RNG = np.random.default_rng(7)
CENTERS = np.linalg.qr(RNG.normal(size=(D, D)))[0][:4]  # 4 orthonormal cluster centres


def _unit(v):
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _around(center, n, rng, weight=0.3):
    """n unit vectors whose cosine to ``center`` is ≈ sqrt(weight) and to each other ≈ weight (± 0.06)."""
    noise = _unit(rng.normal(size=(n, D)))
    return _unit(np.sqrt(weight) * center + np.sqrt(1 - weight) * noise)


def _mix(a, cos, rng):
    """A unit vector at exactly cosine ``cos`` from unit vector ``a``."""
    r = rng.normal(size=D)
    r = _unit(r - (r @ a) * a)
    return cos * a + np.sqrt(1 - cos ** 2) * r


def planted():
    """id → vector per source, and the truth: copies above/below 0.6, eval copies above/below 0.45."""
    rng = np.random.default_rng(0)
    web = {f"w{c}-{i:02d}": v for c in range(4) for i, v in enumerate(_around(CENTERS[c], 12, rng))}
    web["copy-hi"] = _mix(web["w1-03"], 0.8, rng)     # a copy: cosine 0.8 > 0.6
    web["copy-lo"] = _mix(web["w2-05"], 0.5, rng)     # not a copy: 0.5
    ev = {"e0": _unit(rng.normal(size=D)), "e1": _unit(rng.normal(size=D))}
    web["evcopy-hi"] = _mix(ev["e0"], 0.5, rng)       # > 0.45: removed
    web["evcopy-lo"] = _mix(ev["e1"], 0.4, rng)       # < 0.45: kept
    cur = {f"q{i}": _around(CENTERS[2], 1, rng, 0.5)[0] for i in range(5)}  # curated: all near cluster 2
    return {"web": web, "cur": cur, "ev": ev}


VECTORS = planted()
ID = {name: hashlib.sha256(name.encode()).hexdigest() for vecs in VECTORS.values() for name in vecs}  # stable ids


class FakeEmbed(Stage):
    name = "embed"
    per_source = True
    schema = embeddings_schema(D)
    output = "embeddings"

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        vecs = VECTORS[ctx.partition.name]
        names = sorted(vecs)
        flat = pa.array(np.stack([vecs[n] for n in names]).astype(np.float16).reshape(-1))
        yield 0, pa.table({"image_id": [ID[n] for n in names], "source": [ctx.partition.name] * len(names),
                           "kind": [ctx.partition.kind] * len(names),
                           "embedding": pa.FixedSizeListArray.from_arrays(flat, D), "model": ["planted"] * len(names)})


def _no_removals(stage_name):
    class NoRemovals(Stage):
        name = stage_name
        upstream = ("embed",)
        kinds = ("uncurated",)
        schema = DECISIONS_SCHEMA
        output = "decisions"

        def plan(self, ctx):
            return [Shard(0)]

        def compute(self, ctx, shards):
            yield 0, DECISIONS_SCHEMA.empty_table()
    return NoRemovals


@pytest.fixture
def engine(tmp_path) -> Engine:
    load_builtin_stages()
    registry: dict = {}
    for cls in (FakeEmbed, _no_removals("hash_dedup"), _no_removals("nsfw")):
        register(cls, registry)
    for name in ("copy_dedup", "cluster", "retrieve"):
        register(type(REGISTRY[name]), registry)
    cfg = parse_config({"root": str(tmp_path / "run"),
                        "sources": {"uncurated": [{"name": "web", "images": "x"}], "curated": [{"name": "cur", "images": "x"}],
                                    "eval": [{"name": "ev", "images": "x"}]},
                        "engine": {"shard_rows": 16}, "copy_dedup": {"k": 8},
                        "cluster": {"n_clusters": 4, "seed": 0, "nredo": 3},
                        "retrieve": {"method": "cluster", "min_hits": 3, "per_cluster": 5}}, base=tmp_path)
    return Engine(cfg, show_progress=False, registry=registry)


def _names(ids):
    back = {v: k for k, v in ID.items()}
    return [back[i] for i in ids]


def test_copy_dedup_finds_exactly_the_planted_copies(engine):
    engine.ensure("copy_dedup")
    rows = {n: r for n, r in zip(_names(engine.read_table("copy_dedup")["image_id"].to_pylist()),
                                 engine.read_table("copy_dedup").to_pylist())}
    removed = {n: r for n, r in rows.items() if r["decision"] == "removed"}
    assert set(rows) == set(VECTORS["web"])  # one decision per uncurated image
    pair = sorted(["copy-hi", "w1-03"], key=lambda n: ID[n])  # the smaller image_id is kept
    assert removed.keys() == {pair[1], "evcopy-hi"}, removed.keys()
    assert removed[pair[1]]["reason"] == "copy" and removed[pair[1]]["ref_id"] == ID[pair[0]]
    assert abs(removed[pair[1]]["score"] - 0.8) < 0.01
    ev = removed["evcopy-hi"]
    assert ev["reason"] == "eval_copy:ev" and ev["ref_id"] == ID["e0"] and abs(ev["score"] - 0.5) < 0.01


def test_cluster_recovers_planted_clusters_and_retrieve_follows_the_queries(engine):
    engine.ensure("retrieve")
    clusters = engine.read_table("cluster").to_pylist()
    by_name = dict(zip(_names([r["image_id"] for r in clusters]), clusters))
    for c in range(4):
        labels = {by_name[f"w{c}-{i:02d}"]["cluster"] for i in range(12) if f"w{c}-{i:02d}" in by_name}
        assert len(labels) == 1, (c, labels)  # each planted cluster is one k-means cluster
    centroids = np.load(__import__("io").BytesIO(engine.read_artifact("cluster", "centroids.npz")))["level0"]
    assert centroids.shape == (4, D)
    hits = engine.read_table("retrieve").to_pylist()
    target = by_name["w2-00"]["cluster"]
    assert hits and all(h["cluster"] == target and h["method"] == "cluster" for h in hits)
    assert len(hits) == 5 and all(h["query_source"] == "cur" and h["query_id"] for h in hits)  # per_cluster cap
    # removed images are never retrieved
    removed = {r["image_id"] for r in engine.read_table("copy_dedup").to_pylist() if r["decision"] == "removed"}
    assert not removed & {h["image_id"] for h in hits}


def test_sample_retrieval_and_retrieve_settings_recompute_only_retrieve(engine, tmp_path):
    engine.ensure("retrieve")
    cfg = engine.config.model_copy(update={"retrieve": engine.config.retrieve.model_copy(
        update={"method": "sample", "k": 2})})
    eng2 = Engine(cfg, show_progress=False, registry=engine.registry)
    statuses = {s.stage: s for s in eng2.run(until="retrieve")}
    assert statuses["retrieve"].computed and not statuses["cluster"].computed and not statuses["copy_dedup"].computed
    hits = eng2.read_table("retrieve").to_pylist()
    assert len(hits) == 5 * 2 and {h["method"] for h in hits} == {"sample"}
    assert sorted({h["rank"] for h in hits}) == [0, 1]
