"""What the dashboard pages show, from RunData, checked against the engine and `lvd explain`."""
from __future__ import annotations

import pytest

from pipeline.config import load_config
from pipeline.dashboard.data import CLUSTERS_PER_PAGE, NotFound, RunData, page_bounds
from pipeline.explain import explain


@pytest.fixture(scope="module")
def data(demo_run):
    cfg, _ = demo_run
    d = RunData(load_config(cfg))
    yield d
    d.close()


def test_page_bounds() -> None:
    assert page_bounds(0, 1, 10) == (0, 0, 1)
    assert page_bounds(25, 3, 10) == (20, 25, 3)
    for bad in (0, 4):
        with pytest.raises(NotFound):
            page_bounds(25, bad, 10)


def test_the_index_is_loaded_once_per_set_of_outputs(data) -> None:
    assert data.index() is data.index()


def test_provenance_is_the_explain_trail(data) -> None:
    eng = data.engine
    removed = next(r for r in eng.read_table("hash_dedup").to_pylist() if r["decision"] == "removed")
    retrieved = eng.read_table("retrieve").to_pylist()[0]
    failed = next(r for r in eng.read_table("ingest", columns=["image_id", "status"]).to_pylist() if r["status"] != "ok")
    for image_id in (removed["image_id"], retrieved["image_id"], retrieved["query_id"], failed["image_id"]):
        got = data.trail(image_id)
        assert got["trail"] == explain(eng, image_id)
        assert got["text"].startswith(f"image {image_id}")
    assert removed["ref_id"] in data.trail(removed["image_id"])["refs"]
    with pytest.raises(NotFound):
        data.trail("0" * 64)
    with pytest.raises(NotFound):
        data.trail("../../etc/passwd")


def test_search_by_url_or_id(data) -> None:
    row = data.engine.read_table("ingest", "web", ["image_id", "url"]).to_pylist()[0]
    assert data.resolve(row["url"]) == row["image_id"]
    assert data.resolve(f"  {row['image_id'].upper()} ") == row["image_id"]
    for bad in ("http://127.0.0.1:1/nothing.jpg", "", "0" * 64):
        with pytest.raises(NotFound):
            data.resolve(bad)


def test_clusters_sort_and_pages(data) -> None:
    page, extra = data.clusters("size", "desc", 1)
    sizes = [r["size"] for r in page.rows]
    assert sizes == sorted(sizes, reverse=True) and page.total == len(data.index().clusters["size"])
    assert [r["size"] for r in data.clusters("size", "asc")[0].rows] == sorted(sizes)
    assert [r["cluster"] for r in data.clusters("cluster", "asc")[0].rows] == list(range(min(page.total, CLUSTERS_PER_PAGE)))
    assert data.clusters("nonsense", "sideways")[1] == {"sort": "size", "order": "desc", "colors": extra["colors"]}
    with pytest.raises(NotFound):
        data.clusters(page=2)


def test_cluster_page(data) -> None:
    top = data.clusters("retrieved", "desc")[0].rows[0]  # a cluster retrieval took images from
    page = data.cluster(top["cluster"])
    members = page["members"].rows
    assert page["members"].total == top["size"] and len(members) == min(top["size"], 48)
    assert [m["similarity"] for m in members] == sorted((m["similarity"] for m in members), reverse=True)
    retrieved = {r["image_id"] for r in data.engine.read_table("retrieve").to_pylist()}
    assert all(m["retrieved"] == (m["id"] in retrieved) for m in members)
    assert sum(q["hits"] for q in page["queries"]) >= top["retrieved"] > 0
    for bad in (-1, page["count"]):
        with pytest.raises(NotFound):
            data.cluster(bad)


def test_query_page_lists_its_neighbours_by_rank(data) -> None:
    rows = data.engine.read_table("retrieve").to_pylist()
    query_id = next(r["query_id"] for r in rows if r["query_id"])
    got = data.query(query_id)
    mine = sorted((r for r in rows if r["query_id"] == query_id), key=lambda r: (r["rank"], r["image_id"]))
    assert [(h["id"], h["rank"]) for h in got["hits"].rows] == [(r["image_id"], r["rank"]) for r in mine]
    assert got["query"]["source"] == "cur" and got["query"]["retrieved"] == len(mine)
    with pytest.raises(NotFound):
        data.query(rows[0]["image_id"])  # an uncurated image is not a query
    queries, extra = data.queries("cur")
    assert queries.total == data.engine.read_table("embed", "cur", ["image_id"]).num_rows
    with pytest.raises(NotFound):
        data.queries("web")


def test_removed_pages(data) -> None:
    dups, _ = data.removed("hash_dedup", "near_duplicate")
    assert dups.rows and all(r["ref"] and r["ref"]["known"] for r in dups.rows)  # shown beside what they duplicate
    nsfw, _ = data.removed("nsfw", None)
    assert nsfw.rows and all(not r["in_clear"] and "NSFW" in r["why"] for r in nsfw.rows)
    failed, extra = data.removed("ingest", None)
    assert failed.rows and all(r["url"] for r in failed.rows)
    assert {g["reason"] for g in extra["groups"]} == {r["reason"] for r in failed.rows}
    assert data.removed("face_blur", None)[0].total == 0  # a stage that removes nothing
    with pytest.raises(NotFound):
        data.removed("no_such_stage", None)


def test_faces_and_stage_pages(data) -> None:
    faces = data.faces()
    assert faces.rows and all(r["faces"] > 0 for r in faces.rows)
    stage = data.stage("cluster")
    assert stage["entry"]["fingerprint"] == data.engine.stage_fingerprint("cluster")
    assert stage["units"][0]["manifest"].endswith("_manifest.json")
    assert any(a.endswith("centroids.npz") for a in stage["units"][0]["artifacts"])
    with pytest.raises(NotFound):
        data.stage("nope")
