"""The three filter stages in the `curate-and-train` flow, end to end on the demo corpus (served on loopback)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

import flows.curate as curate
from pipeline.config import load_config
from pipeline.democorpus import build_demo_corpus, serve_demo_corpus
from pipeline.engine import Engine


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with serve_demo_corpus(root / "corpus", port=0) as server:
        corpus = build_demo_corpus(root / "corpus", base_url=server.url)
        cfg = root / "demo.yaml"
        cfg.write_text(
            "name: filterflow\nroot: out\n"
            f"sources:\n  uncurated: [{{name: web, urls: {corpus.urls}, warc: ['{corpus.warc}']}}]\n"
            f"  curated: [{{name: cur, images: {corpus.curated}}}]\n"
            "engine: {shard_rows: 32}\n"
            "ingest: {allow_private_addresses: true}\n"
            "hash_dedup: {radius: 12}\n")
        yield cfg, corpus, server


def test_filters_run_in_the_flow_and_rerun_is_cached(demo, ray_session):
    cfg, corpus, server = demo
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}), prefect_test_harness(server_startup_timeout=60):
        first = curate.curate_and_train(str(cfg), until="face_blur")
        assert [s["stage"] for s in first] == ["ingest", "hash_dedup", "nsfw", "face_blur"]
        assert all(s["state"] == "done" and s["computed"] for s in first)
        requests = server.requests
        second = curate.curate_and_train(str(cfg), until="face_blur")
        assert not any(s["computed"] for s in second) and server.requests == requests

    eng = Engine(load_config(cfg), show_progress=False)
    ok = {r["image_id"]: r["url"] for r in eng.read_table("ingest", "web", ["image_id", "url", "status"]).to_pylist()
          if r["status"] == "ok"}
    truth = json.loads(Path(corpus.manifest).read_text())["truth"]
    for stage in ("hash_dedup", "nsfw"):
        rows = eng.read_table(stage).to_pylist()
        assert sorted(r["image_id"] for r in rows) == sorted(ok)  # one decision per ok uncurated image
    dedup = {ok[r["image_id"]]: r for r in eng.read_table("hash_dedup").to_pylist()}
    for group in truth["exact_duplicates"]:  # byte-identical copies never both survive
        present = [u for u in group if u in dedup]
        assert sum(dedup[u]["decision"] == "kept" for u in present) <= 1
    for family in truth["near_duplicate_families"].values():  # re-encodes and resizes collapse
        assert sum(dedup[u]["decision"] == "kept" for u in family if u in dedup) < len(family)
    nsfw = eng.read_table("nsfw").to_pylist()
    assert all(0 <= r["score"] <= 1 for r in nsfw) and not any(r["decision"] == "removed" for r in nsfw)
    faces = {ok[r["image_id"]]: r["faces"] for r in eng.read_table("face_blur", columns=["image_id", "faces"]).to_pylist()}
    assert faces[f"{server.url}/photos/astronaut.jpg"] >= 1
