"""Real semantics on the demo corpus: the curation DAG with the packaged EfficientNet-Lite0 embedder
(tests/conftest.py demo_run, as configs/demo.yaml) recovers the corpus's ground truth, reported by
pipeline.demoeval: retrieval precision@k, copies removed / views kept, decontamination, cluster purity."""
from __future__ import annotations

import json

import pytest

from photos import artifacts_dir
from pipeline.config import load_config
from pipeline.demoeval import FILTER_STAGES, DemoReport, evaluate_demo, family_of_urls, main
from pipeline.engine import Engine


@pytest.fixture(scope="module")
def run(demo_run):
    cfg, corpus = demo_run
    engine = Engine(load_config(cfg), show_progress=False)
    manifest = json.loads(corpus.manifest.read_text())
    report = evaluate_demo(engine, manifest)
    (artifacts_dir() / "demo-semantics.txt").write_text("\n".join(report.lines()) + "\n")
    print("\n".join(report.lines()))
    return engine, manifest, report


def _decisions(engine: Engine) -> dict[str, tuple[str, str, str | None]]:
    """image_id → (stage, reason) of its removal (first removing stage), or absent when kept."""
    out: dict = {}
    for stage in FILTER_STAGES:
        for row in engine.read_table(stage).to_pylist():
            if row["decision"] == "removed":
                out.setdefault(row["image_id"], (stage, row["reason"]))
    return out


def _urls(engine: Engine) -> dict[str, str]:
    return {r["url"]: r["image_id"] for r in engine.read_table("ingest", "web", ["url", "image_id", "status"]).to_pylist()
            if r["status"] == "ok"}


def test_retrieval_top_ranks_are_the_query_photos_own_images(run) -> None:
    _, manifest, report = run
    assert report.k == 4
    assert sorted(report.precision) == sorted(manifest["truth"]["families"])
    assert report.mean_precision >= 0.9, report.precision
    assert min(report.precision.values()) >= 0.75, report.precision


def test_copy_dedup_removes_copies_and_keeps_distinct_photos(run) -> None:
    engine, manifest, report = run
    # of each family photo and its copies (mirrors and rotations the PCA hash misses, near-duplicates)
    # exactly one image is kept; copy_dedup does most of the removing
    assert sorted(report.copies_kept) == sorted(manifest["truth"]["families"])
    assert {name: len(kept) for name, kept in report.copies_kept.items() if len(kept) != 1} == {}
    assert report.copies_removed_by.get("copy_dedup", 0) >= 8, report.copies_removed_by
    # views are distinct images: no dedup removes them (the demo_run fixture's low NSFW threshold may)
    assert report.views_removed and not {u: s for u, s in report.views_removed.items() if s and s != "nsfw"}
    removed, ids = _decisions(engine), _urls(engine)
    # distinct photos: no photo original is removed as a copy of another photo
    photo_of = manifest["truth"]["derived_from"]
    for row in engine.read_table("copy_dedup").to_pylist():
        if row["decision"] == "removed" and row["reason"] == "copy":
            url = next(u for u, i in ids.items() if i == row["image_id"])
            ref = next((u for u, i in ids.items() if i == row["ref_id"]), None)
            if url in photo_of and ref in photo_of:
                assert photo_of[url] == photo_of[ref], (url, ref)


def test_decontamination_removes_the_eval_copies_only(run) -> None:
    engine, manifest, _ = run
    removed, ids = _decisions(engine), _urls(engine)
    eval_removed = {i for i, (stage, reason) in removed.items() if str(reason).startswith("eval_copy")}
    photo_of = manifest["truth"]["derived_from"]
    eval_photos = {photo_of[urls[0]] for urls in manifest["truth"]["eval_copies"].values()}
    assert eval_removed, "nothing was removed as an eval copy"
    by_id = {i: u for u, i in ids.items()}
    assert {photo_of.get(by_id[i]) for i in eval_removed} <= eval_photos
    # no uncurated image of an eval photo survives
    assert not [u for u, p in photo_of.items() if p in eval_photos and u in ids and ids[u] not in removed]


def test_clusters_group_images_of_one_photo(run) -> None:
    _, manifest, report = run
    assert report.purity is not None and report.purity >= 0.6, report.lines()
    assert set(report.clusters_per_family) == set(manifest["truth"]["families"])


def test_family_roles_and_the_cli(run, demo_run, capsys) -> None:
    cfg, corpus = demo_run
    roles = family_of_urls(run[1])
    assert {r for _, r in roles.values()} == {"original", "view", "copy", "derived"}
    assert main(["--config", str(cfg), "--manifest", str(corpus.manifest)]) == 0
    out = capsys.readouterr().out
    assert "retrieval precision@4" in out and "cluster purity" in out and "views kept: " in out


def test_report_without_families_says_so() -> None:
    report = evaluate_demo(None, {"truth": {}})
    assert report.notes and "no photo families" in report.notes[0]
    assert isinstance(report, DemoReport)
