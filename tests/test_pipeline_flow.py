"""The whole curation DAG in the `curate-and-train` flow, end to end on the demo corpus (served on loopback):
the filters (issue 3) and embed → copy_dedup → cluster → retrieve → dataset (issue 4)."""
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
            "hash_dedup: {radius: 12}\n"
            "embed: {model: 'timm:efficientnet_lite0:package', batch_size: 16}\n"
            "copy_dedup: {k: 16, threshold: 0.85, eval_threshold: 0.83}\n"
            "cluster: {n_clusters: 8}\n"
            "retrieve: {min_hits: 0, per_cluster: 20}\n")
        yield cfg, corpus, server


@pytest.fixture(scope="module")
def flow_runs(demo, ray_session):
    """The DAG through `dataset` in the flow, then the same again (cached), then with new retrieve settings."""
    cfg, corpus, server = demo
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}), prefect_test_harness(server_startup_timeout=60):
        first = curate.curate_and_train(str(cfg), until="dataset")
        requests = server.requests
        second = curate.curate_and_train(str(cfg), until="dataset")
        assert server.requests == requests  # the rerun sends no HTTP request
        cfg.write_text(cfg.read_text().replace("per_cluster: 20", "per_cluster: 5"))
        third = curate.curate_and_train(str(cfg), until="dataset")
        cfg.write_text(cfg.read_text().replace("per_cluster: 5", "per_cluster: 20"))
    return first, second, third


def test_filters_run_in_the_flow_and_rerun_is_cached(demo, flow_runs):
    cfg, corpus, server = demo
    first, second, _ = flow_runs
    assert [s["stage"] for s in first] == ["ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup",
                                           "cluster", "retrieve", "dataset"]
    assert all(s["state"] == "done" and s["computed"] for s in first)
    assert not any(s["computed"] for s in second)

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


def test_dataset_end_to_end(demo, flow_runs):
    cfg, corpus, server = demo
    first, _, third = flow_runs
    eng = Engine(load_config(cfg), show_progress=False)
    ds = eng.read_table("dataset").to_pylist()
    ids = [r["image_id"] for r in ds]
    assert len(ids) == len(set(ids))  # no image twice
    curated = {r["image_id"] for r in eng.read_table("ingest", "cur", ["image_id", "status"]).to_pylist()
               if r["status"] == "ok"}
    assert curated <= {r["image_id"] for r in ds if r["origin"] == "curated"}  # every curated image is in it
    retrieved = {r["image_id"] for r in eng.read_table("retrieve").to_pylist()}
    assert {r["image_id"] for r in ds if r["origin"] == "retrieved"} == retrieved
    removed = {r["image_id"] for s in ("hash_dedup", "nsfw", "copy_dedup") for r in eng.read_table(s).to_pylist()
               if r["decision"] == "removed"}
    assert not removed & set(ids)
    assert all(r["retrieved_by"] and r["cluster"] is not None for r in ds if r["origin"] == "retrieved")
    # the card's counts add up with the decisions table
    summary = json.loads(eng.read_artifact("dataset", "summary.json"))
    web = summary["sources"]["web"]
    n_removed = sum(sum(v.values()) for v in web["removed"].values())
    assert n_removed == len(removed) and web["retrieved"] == len(retrieved)
    assert web["ingest_status"]["ok"] == len(eng.read_table("hash_dedup").to_pylist())
    card = eng.read_artifact("dataset", "dataset_card.md").decode()
    assert not summary["random_weights"] and "random weights" not in card and "efficientnet_lite0" in card
    # changing a retrieve setting recomputed retrieve and dataset only
    changed = {s["stage"] for s in third if s["computed"]}
    assert changed == {"retrieve", "dataset"}, changed


# train → distill → eval in the flow (the demo config's tiny settings) is covered by tests/test_demo_fresh.py,
# which runs the whole DAG through the real deployment exactly as `bash infra/demo.sh` does.
