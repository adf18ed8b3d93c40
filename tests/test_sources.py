"""Input sources: URL lists, WARCs, folders, digests."""
from __future__ import annotations

import gzip
import hashlib
import io
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.config import Source
from pipeline.sources import (
    InputItem,
    html_image_urls,
    image_id_for,
    iter_source_items,
    load_item_bytes,
    read_url_list,
    source_digest,
    warc_http_status,
)

PAGE = """<!DOCTYPE html><html><head><base href="/img/"></head><body>
<img src="a.jpg"><img src="../b.png"><img src="http://other.example/c.jpg">
<img src="data:image/png;base64,iVBORw0KGgo="><img src="  "><img alt="no src">
<IMG SRC="/d.jpg?x=1&amp;y=2">
</body></html>"""


def _jpeg(colour=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _response(writer, uri, body, ctype, status="200 OK"):
    headers = StatusAndHeaders(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))],
                               protocol="HTTP/1.1")
    return writer.create_warc_record(uri, "response", payload=io.BytesIO(body), length=len(body),
                                     http_headers=headers)


def _write_warc(path: Path, records: list[tuple[str, bytes, str, str]]) -> None:
    with open(path, "wb") as fh:
        writer = WARCWriter(fh, gzip=path.name.endswith(".gz"))
        for uri, body, ctype, status in records:
            writer.write_record(_response(writer, uri, body, ctype, status))


# --------------------------------------------------------------------------- URL lists


def test_image_id_is_sha256_of_url():
    assert image_id_for("http://a/b.jpg") == hashlib.sha256(b"http://a/b.jpg").hexdigest()


def test_read_txt_skips_blank_and_comments(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("# header\nhttp://a/1.jpg\n\n  http://a/2.jpg  \n#http://skip\nnot a url\n")
    assert list(read_url_list(p)) == ["http://a/1.jpg", "http://a/2.jpg", "not a url"]


def test_read_txt_gz(tmp_path):
    p = tmp_path / "u.txt.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("http://a/1.jpg\nhttp://a/2.jpg\n")
    assert list(read_url_list(p)) == ["http://a/1.jpg", "http://a/2.jpg"]


def test_read_csv(tmp_path):
    p = tmp_path / "u.csv"
    p.write_text('id,url,caption\n1,http://a/1.jpg,"a, b"\n2,,empty\n3,http://a/3.jpg,x\n')
    assert list(read_url_list(p)) == ["http://a/1.jpg", "http://a/3.jpg"]


def test_read_parquet(tmp_path):
    p = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": ["http://a/1.jpg", None, "http://a/2.jpg"], "n": [1, 2, 3]}), p)
    assert list(read_url_list(p)) == ["http://a/1.jpg", "http://a/2.jpg"]


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_missing_url_column_names_file(tmp_path, suffix):
    p = tmp_path / f"list{suffix}"
    if suffix == ".csv":
        p.write_text("link\nhttp://a/1.jpg\n")
    else:
        pq.write_table(pa.table({"link": ["http://a/1.jpg"]}), p)
    with pytest.raises(ValueError, match=r"list\.(csv|parquet).*'url' column.*'link'"):
        list(read_url_list(p))


def test_url_source_dedupes_and_keeps_malformed(tmp_path):
    p = tmp_path / "u.txt"
    p.write_text("http://a/1.jpg\nhttp://a/2.jpg\nhttp://a/1.jpg\nht!tp:/bad\n")
    items = list(iter_source_items(Source(name="s", urls=p)))
    assert [i.url for i in items] == ["http://a/1.jpg", "http://a/2.jpg", "ht!tp:/bad"]
    assert all(i.origin == "url" and i.locator is None and i.image_id == image_id_for(i.url) for i in items)


# --------------------------------------------------------------------------- WARC


def test_html_image_urls_honours_base_and_skips_data():
    assert html_image_urls(PAGE, "http://site.example/pages/p.html") == [
        "http://site.example/img/a.jpg",
        "http://site.example/b.png",
        "http://other.example/c.jpg",
        "http://site.example/d.jpg?x=1&y=2",
    ]


@pytest.mark.parametrize("name", ["crawl.warc.gz", "crawl.warc"])
def test_warc_round_trip(tmp_path, name):
    photo, png = _jpeg(), b"\x89PNG\r\n\x1a\nnot really"
    warc = tmp_path / name
    _write_warc(warc, [
        ("http://site.example/pages/p.html", PAGE.encode(), "text/html; charset=utf-8", "200 OK"),
        ("http://site.example/img/a.jpg", photo, "image/jpeg", "200 OK"),  # also linked from the page
        ("http://site.example/raw/e.png", png, "application/octet-stream", "200 OK"),  # by extension
        ("http://site.example/gone.gif", b"gone", "image/gif", "404 Not Found"),
        ("http://site.example/notes.txt", b"text", "text/plain", "200 OK"),
        ("http://site.example/missing.jpg", b"<html>404</html>", "text/html", "404 Not Found"),
    ])
    items = list(iter_source_items(Source(name="w", warc=[str(tmp_path / "*.warc*")])))
    by_url = {i.url: i for i in items}
    assert [i.url for i in items] == [
        "http://site.example/img/a.jpg", "http://site.example/b.png", "http://other.example/c.jpg",
        "http://site.example/d.jpg?x=1&y=2", "http://site.example/raw/e.png", "http://site.example/gone.gif",
    ]
    # first occurrence wins: the page link precedes the image record
    assert by_url["http://site.example/img/a.jpg"].origin == "url"
    e, gone = by_url["http://site.example/raw/e.png"], by_url["http://site.example/gone.gif"]
    assert e.origin == gone.origin == "warc" and e.locator.startswith(f"{warc}#")
    assert load_item_bytes(e) == png and load_item_bytes(gone) == b"gone"
    assert warc_http_status(e) == 200 and warc_http_status(gone) == 404


def test_warc_image_record_bytes_exact(tmp_path):
    photo = _jpeg((10, 200, 90), (64, 48))
    warc = tmp_path / "one.warc.gz"
    _write_warc(warc, [("http://site.example/p.jpg", photo, "image/jpeg; q=1", "200 OK")])
    (item,) = iter_source_items(Source(name="w", warc=[str(warc)]))
    assert item == InputItem(image_id_for("http://site.example/p.jpg"), "http://site.example/p.jpg", "warc",
                             f"{warc}#0")
    assert load_item_bytes(item) == photo


def test_url_list_wins_over_warc(tmp_path):
    warc = tmp_path / "w.warc.gz"
    _write_warc(warc, [("http://site.example/p.jpg", _jpeg(), "image/jpeg", "200 OK")])
    urls = tmp_path / "u.txt"
    urls.write_text("http://site.example/p.jpg\n")
    items = list(iter_source_items(Source(name="s", urls=urls, warc=[str(warc)])))
    assert [(i.url, i.origin) for i in items] == [("http://site.example/p.jpg", "url")]


def test_load_item_bytes_rejects_url_items():
    with pytest.raises(ValueError, match="origin 'url'"):
        load_item_bytes(InputItem(image_id_for("http://a/b.jpg"), "http://a/b.jpg", "url", None))


# --------------------------------------------------------------------------- folders and digests


def _image_folder(root: Path) -> Path:
    folder = root / "imgs"
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / ".hidden").mkdir()
    (folder / "b.JPG").write_bytes(_jpeg((1, 2, 3)))
    (folder / "a.png").write_bytes(b"\x89PNG fake")
    (folder / "sub" / "c.webp").write_bytes(b"RIFF fake")
    (folder / "sub" / "deeper" / "d.TIFF").write_bytes(b"II*\x00 fake")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden" / "e.jpg").write_bytes(b"hidden")
    return folder


def test_folder_listing(tmp_path):
    folder = _image_folder(tmp_path)
    items = list(iter_source_items(Source(name="f", images=folder)))
    rel = [Path(i.locator).relative_to(folder.resolve()).as_posix() for i in items]
    assert rel == ["a.png", "b.JPG", "sub/c.webp", "sub/deeper/d.TIFF"]
    first = items[0]
    assert first.origin == "file" and first.url == (folder / "a.png").resolve().as_uri()
    assert first.image_id == image_id_for(first.url)
    assert load_item_bytes(items[1]) == (folder / "b.JPG").read_bytes()


def test_source_digest_survives_move_and_tracks_changes(tmp_path):
    a = tmp_path / "a"
    _image_folder(a)
    (a / "urls.txt").write_text("http://a/1.jpg\n")
    _write_warc(a / "w.warc.gz", [("http://site.example/p.jpg", _jpeg(), "image/jpeg", "200 OK")])

    def src(root: Path) -> Source:
        return Source(name="s", urls=root / "urls.txt", warc=[str(root / "*.warc.gz")], images=root / "imgs")

    digest = source_digest(src(a))
    assert digest == source_digest(src(a)) and len(digest) == 64
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    assert source_digest(src(b)) == digest

    (b / "imgs" / "a.png").write_bytes(b"\x89PNG changed")
    changed = source_digest(src(b))
    assert changed != digest
    (b / "imgs" / "a.png").rename(b / "imgs" / "a2.png")
    renamed = source_digest(src(b))
    assert renamed not in (digest, changed)
    (b / "imgs" / "extra.gif").write_bytes(b"GIF89a")
    assert source_digest(src(b)) not in (digest, changed, renamed)
    (b / "imgs" / "notes.txt").write_text("non-images do not count")
    (b / "urls.txt").write_text("http://a/2.jpg\n")
    assert source_digest(src(b)) != source_digest(src(a))


@pytest.mark.parametrize("field", ["urls", "images", "warc"])
def test_missing_inputs_name_source_and_path(tmp_path, field):
    missing = tmp_path / "nope"
    value = [str(missing / "*.warc.gz")] if field == "warc" else missing
    source = Source(name="crawl-1", **{field: value})
    for call in (source_digest, lambda s: list(iter_source_items(s))):
        with pytest.raises(FileNotFoundError) as err:
            call(source)
        msg = str(err.value)
        assert "'crawl-1'" in msg and str(missing) in msg and f"fix `{field}:`" in msg
