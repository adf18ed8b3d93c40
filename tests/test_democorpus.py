"""The demo corpus: deterministic build, local server, ground truth matching the sources."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pipeline.config import Source
from pipeline.democorpus import build_demo_corpus, serve_demo_corpus
from pipeline.sources import iter_source_items, load_item_bytes, warc_http_status

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with _OPENER.open(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read()


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    with serve_demo_corpus(root, port=0) as server:
        corpus = build_demo_corpus(root, base_url=server.url)
        yield corpus, server, json.loads(corpus.manifest.read_text())


def test_build_is_deterministic_and_idempotent(tmp_path):
    a = build_demo_corpus(tmp_path / "a")
    b = build_demo_corpus(tmp_path / "b")
    tree = _tree(a.root)
    assert tree == _tree(b.root)
    mtimes = {p: p.stat().st_mtime_ns for p in a.root.rglob("*") if p.is_file()}
    assert build_demo_corpus(tmp_path / "a") == a
    assert {p: p.stat().st_mtime_ns for p in a.root.rglob("*") if p.is_file()} == mtimes
    # a damaged or missing file is restored; stray files in managed folders are removed
    (a.site / "robots.txt").write_text("broken")
    (a.curated / "astronaut.jpg").unlink()
    (a.curated / "stray.jpg").write_bytes(b"x")
    build_demo_corpus(tmp_path / "a")
    assert _tree(a.root) == tree


def test_manifest_describes_corpus(served):
    corpus, server, manifest = served
    counts = manifest["counts"]
    assert manifest["base_url"] == server.url
    assert 60 <= counts["unique_urls"] <= 180 and counts["url_lines"] == counts["unique_urls"] + 1
    assert 1_000_000 < counts["bytes"] < 10_000_000
    truth = manifest["truth"]
    assert len(truth["duplicate_url_lines"]) == 1
    assert {b["reason"] for b in truth["bad"]} == {"not_found", "not_an_image", "truncated_image",
                                                   "robots_disallowed"}
    assert len(truth["exact_duplicates"]) >= 3 and len(truth["near_duplicate_families"]) >= 5
    assert all(len(f) == 6 for f in truth["near_duplicate_families"].values())
    # photo families: 4 quadrant views + 2 copies each, listed; the curated set is the family photos
    assert len(truth["families"]) == 8
    listed = set((corpus.urls).read_text().split())
    for name, fam in truth["families"].items():
        assert len(fam["views"]) == 4 and len(fam["copies"]) == 2
        assert {fam["original"], *fam["views"], *fam["copies"]} <= listed
        assert all(truth["derived_from"][u] == name for u in [fam["original"], *fam["views"], *fam["copies"]])
    curated = sorted(p.stem for p in corpus.curated.rglob("*") if p.is_file())
    assert curated == sorted(truth["families"])
    for rel, meta in manifest["files"].items():
        assert (corpus.root / rel).stat().st_size == meta["size"]
    assert sorted(p.name for p in corpus.eval.iterdir()) == ["coin", "flower", "pattern"]
    lines = corpus.urls.read_text().splitlines()
    assert len(lines) == counts["url_lines"] and all(u.startswith(server.url + "/") for u in lines)


def test_server_serves_images_and_robots(served):
    corpus, server, manifest = served
    status, ctype, body = _get(server.url + "/photos/astronaut.jpg")
    assert (status, ctype) == (200, "image/jpeg") and body == (corpus.site / "photos/astronaut.jpg").read_bytes()
    assert _get(server.url + "/gen/gradient-00.png")[:2] == (200, "image/png")
    status, ctype, robots = _get(server.url + "/robots.txt")
    assert status == 200 and ctype.startswith("text/plain") and b"Disallow: /private/" in robots
    assert _get(server.url + "/missing/does-not-exist.jpg")[0] == 404
    assert _get(server.url + "/../manifest.json")[0] == 404
    status, ctype, _ = _get(server.url + "/bad/soft-404.jpg")
    assert status == 200 and ctype.startswith("text/html")
    assert _get(server.url + "/bad/truncated.jpg")[:2] == (200, "image/jpeg")


def test_request_counting_and_access_log(served):
    corpus, server, _ = served
    before = server.requests
    _get(server.url + "/near/astronaut-q30.jpg")
    _get(server.url + "/nothing-here")
    assert server.requests == before + 2
    assert server.paths[-2:] == ["/near/astronaut-q30.jpg", "/nothing-here"]
    log = (corpus.root / "access.log").read_text().splitlines()
    assert log[-2:] == ["GET /near/astronaut-q30.jpg 200", "GET /nothing-here 404"]


def test_sources_match_manifest(served):
    corpus, server, manifest = served
    source = Source(name="demo", urls=corpus.urls, warc=[str(corpus.warc)], images=corpus.curated)
    items = list(iter_source_items(source))
    curated = corpus.curated.resolve()
    got = {
        "url": [i.url for i in items if i.origin == "url"],
        "warc": [i.url for i in items if i.origin == "warc"],
        "file": [Path(i.locator).relative_to(curated).as_posix() for i in items if i.origin == "file"],
    }
    assert got == manifest["expected_items"]
    assert len(items) == len({i.image_id for i in items}) == manifest["counts"]["expected_items"]
    statuses = {im["uri"]: im["status"] for im in manifest["truth"]["warc_images"]}
    for item in (i for i in items if i.origin == "warc"):
        assert warc_http_status(item) == statuses[item.url]
        if statuses[item.url] == 200:
            assert load_item_bytes(item)[:3] in (b"\xff\xd8\xff", b"\x89PN")
    for url in manifest["truth"]["warc_page_only"]:
        assert _get(url)[:2] == (200, "image/jpeg")
