"""Thumbnails: made once from the bytes the dashboard may show, cached under the run root."""
from __future__ import annotations

import io

import pyarrow.compute as pc
import pytest
from PIL import Image

from pipeline.config import load_config
from pipeline.dashboard.data import RunData
from pipeline.dashboard.thumbs import PLACEHOLDER_GREY, THUMB_SIDE, make_thumbnail, placeholder_png


def _one(engine, stage, image_id, column="image"):
    t = engine.read_table(stage, columns=["image_id", column])
    return t.filter(pc.equal(t["image_id"], image_id))[column][0].as_py()


def test_placeholder_is_plain_grey() -> None:
    img = Image.open(io.BytesIO(placeholder_png()))
    assert img.size == (THUMB_SIDE, THUMB_SIDE) and img.convert("RGB").getcolors() == [(THUMB_SIDE ** 2, PLACEHOLDER_GREY)]


def test_make_thumbnail_bounds_the_longer_side() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (1000, 400), (10, 200, 30)).save(buf, format="JPEG")
    thumb = Image.open(io.BytesIO(make_thumbnail(buf.getvalue())))
    assert thumb.format == "JPEG" and thumb.size == (THUMB_SIDE, 102)


@pytest.fixture(scope="module")
def data(demo_run):
    cfg, _ = demo_run
    d = RunData(load_config(cfg))
    yield d
    d.close()


def test_faces_are_thumbnailed_from_the_blurred_bytes(data) -> None:
    eng = data.engine
    faces = eng.read_table("face_blur", columns=["image_id", "faces"])
    nsfw = {r["image_id"]: r["decision"] for r in eng.read_table("nsfw").to_pylist()}
    face_id = next(i for i in faces.filter(pc.greater(faces["faces"], 0))["image_id"].to_pylist() if nsfw[i] == "kept")
    path = data.thumbnail(face_id)
    assert path.is_file() and path.is_relative_to(data.root / "dashboard" / "thumbs")
    assert path.read_bytes() == make_thumbnail(_one(eng, "face_blur", face_id))
    assert path.read_bytes() != make_thumbnail(_one(eng, "ingest", face_id))
    assert data.thumbnail(face_id) == path  # cached: made once
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_nsfw_removed_images_only_get_the_placeholder(data) -> None:
    eng = data.engine
    removed = [r["image_id"] for r in eng.read_table("nsfw").to_pylist() if r["decision"] == "removed"]
    assert removed
    for image_id in removed:
        assert data.thumbnail(image_id) == placeholder_png()
    idx = data.index()
    data.thumbs.ensure(idx.locator, [idx.locator.find(i) for i in removed])  # asking explicitly makes nothing
    made = {p.stem for p in (data.root / "dashboard" / "thumbs").rglob("*.jpg")}
    assert not made & set(removed)


def test_a_page_of_thumbnails_reads_each_shard_once(data, monkeypatch) -> None:
    import pipeline.dashboard.thumbs as thumbs

    idx = data.index()
    loc = idx.locator
    ids = [r["image_id"] for r in data.engine.read_table("cluster", columns=["image_id"]).to_pylist()]
    rows = [loc.find(i) for i in ids]
    todo = [i for i in rows if not data.thumbs.path(loc, i).is_file()]
    reads = []
    real = thumbs.pq.ParquetFile
    monkeypatch.setattr(thumbs.pq, "ParquetFile", lambda path: reads.append(path) or real(path))
    data.thumbs.ensure(loc, rows)
    assert sorted(reads) == sorted({loc.shards[loc.shard[i]] for i in todo})
    assert all(data.thumbs.path(loc, i).is_file() for i in rows)
