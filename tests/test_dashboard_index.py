"""The dashboard's per-run index agrees with the engine's tables (on a real run of the demo corpus)."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from pipeline.config import load_config
from pipeline.dashboard.index import (
    SHOW_CLEAR, SHOW_NO_BYTES, SHOW_NSFW, RunIndex, cache_root, ensure_index, index_key, project_2d,
)
from pipeline.engine import Engine


@pytest.fixture(scope="module")
def run(demo_run):
    cfg, _ = demo_run
    engine = Engine(load_config(cfg), show_progress=False)
    return engine, RunIndex(ensure_index(engine))


def test_index_lives_under_the_run_root_keyed_by_the_outputs(run) -> None:
    engine, idx = run
    assert idx.dir.parent == cache_root(engine) == engine.config.root / "dashboard" / "cache"
    assert idx.key == index_key(engine)
    assert ensure_index(engine) == idx.dir  # built once
    assert not [p for p in idx.dir.parent.iterdir() if p.name.startswith(".tmp-")]


def test_funnel_and_removals_match_the_decisions(run) -> None:
    engine, idx = run
    removed = Counter()
    for stage in ("hash_dedup", "nsfw", "copy_dedup"):
        for r in engine.read_table(stage).to_pylist():
            if r["decision"] == "removed":
                removed[(stage, r["reason"])] += 1
    statuses = Counter(engine.read_table("ingest", columns=["status"])["status"].to_pylist())
    removed.update({("ingest", s): n for s, n in statuses.items() if s != "ok"})
    assert {(g["stage"], g["reason"]): g["count"] for g in idx.meta["removed_groups"]} == removed
    assert removed[("nsfw", "nsfw")] >= 1  # the run removes some images as NSFW

    (web,) = idx.meta["funnel"]
    steps = {s["stage"]: s["remaining"] for s in web["steps"]}
    kept = sum(t.num_rows for t in engine.kept("cluster", "web", ["image_id"]))  # the engine's "kept so far"
    assert steps["copy_dedup"] == kept == engine.status("cluster").rows
    assert steps["ingest"] == Counter(engine.read_table("ingest", "web", ["status"])["status"].to_pylist())["ok"]
    stages = {s["stage"]: s for s in idx.meta["stages"]}
    assert stages["nsfw"]["removed"] == {"nsfw": removed[("nsfw", "nsfw")]}
    assert stages["nsfw"]["kept"] == engine.status("nsfw").rows - removed[("nsfw", "nsfw")]
    assert all(stages[s["stage"]]["fingerprint"] == s["fingerprint"] for s in map(lambda x: x.as_dict(),
                                                                                 engine.status_all()))


def test_clusters_members_and_queries_match_cluster_and_retrieve(run) -> None:
    engine, idx = run
    clusters = engine.read_table("cluster").to_pylist()
    retrieve = engine.read_table("retrieve").to_pylist()
    c = idx.clusters
    k = len(c["size"])
    assert c["size"].sum() == len(clusters) and c["xy"].shape == (k, 2)
    assert ((c["xy"] >= 0) & (c["xy"] <= 1)).all()
    of = {r["image_id"]: r["cluster"] for r in clusters}
    for cl in range(k):
        lo, hi = idx.member_offsets[cl], idx.member_offsets[cl + 1]
        members = idx.members.rows(int(lo), int(hi)).to_pylist()
        assert {m["image_id"] for m in members} == {i for i, x in of.items() if x == cl}
        sims = [m["similarity"] for m in members]
        assert sims == sorted(sims, reverse=True)  # nearest to the centroid first
        assert c["retrieved"][cl] == len({r["image_id"] for r in retrieve if of[r["image_id"]] == cl})
    j = idx.meta["clusters"]["curated_sources"].index("cur")
    assert c["by_source"][:, j].sum() == len({r["image_id"] for r in retrieve})
    assert c["queries_in"][:, j].sum() == engine.read_table("embed", "cur", ["image_id"]).num_rows
    per_query = Counter(r["query_id"] for r in retrieve)
    for q, n in per_query.items():
        i = int(np.searchsorted(idx.query_ids, np.array([q.encode()], idx.query_ids.dtype))[0])
        assert idx.query_counts[i] == n
        rows = idx.by_query.rows(int(idx.query_starts[i]), int(idx.query_starts[i] + n)).to_pylist()
        assert {r["query_id"] for r in rows} == {q} and [r["rank"] for r in rows] == sorted(r["rank"] for r in rows)


def test_locator_shows_only_blurred_screened_bytes(run) -> None:
    engine, idx = run
    loc = idx.locator
    nsfw = {r["image_id"]: r["decision"] for r in engine.read_table("nsfw").to_pylist()}
    face_units = {u.fingerprint for u in engine.units("face_blur")}
    ingest_units = {u.fingerprint for u in engine.units("ingest")}
    for r in engine.read_table("ingest", columns=["image_id", "kind", "status"]).to_pylist():
        i = loc.find(r["image_id"])
        show = int(loc.show[i])
        if r["status"] != "ok":
            assert show == SHOW_NO_BYTES
        elif r["kind"] == "uncurated":
            assert show == (SHOW_NSFW if nsfw[r["image_id"]] == "removed" else SHOW_CLEAR)
            assert loc.units[loc.shard[i]] in face_units  # face_blur's bytes, never ingest's
        else:
            assert show == SHOW_CLEAR and loc.units[loc.shard[i]] in ingest_units


def test_a_changed_stage_gets_its_own_index(run, demo_run) -> None:
    engine, idx = run
    cfg, _ = demo_run
    other = cfg.with_name("demo-fewer.yaml")
    other.write_text(cfg.read_text().replace("retrieve: {method: sample, k: 4}",
                                             "retrieve: {method: cluster, min_hits: 0, per_cluster: 2}"))
    eng2 = Engine(load_config(other), show_progress=False)
    eng2.run(until="dataset")  # retrieve and dataset only (the rest is reused)
    idx2 = RunIndex(ensure_index(eng2))
    assert idx2.key != idx.key and idx2.dir.parent == idx.dir.parent
    assert idx2.clusters["retrieved"].max() <= 2 < idx.clusters["retrieved"].max()
    assert RunIndex(ensure_index(engine)).key == idx.key  # the first run's outputs are untouched


def test_projection_is_deterministic_and_normalised() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    xy, method = project_2d(x)
    again, _ = project_2d(x)
    assert method in ("pca", "umap") and xy.shape == (12, 2)
    assert np.array_equal(xy, again) and xy.min() == 0 and xy.max() == 1
    assert project_2d(np.zeros((0, 8)))[0].shape == (0, 2)
    assert project_2d(np.ones((1, 8)))[0].shape == (1, 2)
    assert pa.array(xy[:, 0]).null_count == 0
