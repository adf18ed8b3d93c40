"""Input sources: turn a configured :class:`~pipeline.config.Source` into input items.

A source may name a URL list (.txt/.txt.gz/.csv/.csv.gz/.parquet), WARC globs and/or a folder
of image files. :func:`iter_source_items` lists them as :class:`InputItem` rows in a
deterministic order, each ``image_id`` once per source (first occurrence wins).
:func:`source_digest` fingerprints the inputs' contents (not their absolute location) so a
cached stage is reused after the repository moves and recomputed when an input changes.
"""
from __future__ import annotations

import csv
import glob
import gzip
import hashlib
import json
import os
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import urljoin, urlsplit

from warcio.archiveiterator import ArchiveIterator

from pipeline.config import Source

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
MAX_HTML_BYTES = 10_000_000  # pages larger than this are not parsed for <img> tags
_CHUNK = 1 << 20


@dataclass(frozen=True)
class InputItem:
    """One image to ingest, before any bytes are fetched or decoded."""

    image_id: str  # image_id_for(url)
    url: str  # input URL; for folder images the file:// URI of the resolved absolute path
    origin: str  # 'url' (fetch over HTTP), 'warc' (bytes in a WARC record), 'file' (local file)
    locator: str | None  # warc: f"{warc_path}#{record_offset}"; file: the path; url: None


def image_id_for(url: str) -> str:
    """Hex sha256 of the URL string (utf-8)."""
    return hashlib.sha256(url.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- URL lists


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _list_kind(path: Path) -> str:
    name = path.name.lower()
    name = name[:-3] if name.endswith(".gz") else name
    for kind in ("csv", "parquet"):
        if name.endswith("." + kind):
            return kind
    return "txt"


def _missing_url_column(path: Path, columns: Iterable[str]) -> ValueError:
    cols = ", ".join(repr(c) for c in columns) or "none"
    return ValueError(f"URL list {path} has no 'url' column (columns: {cols}); rename the URL column to 'url'")


def _read_txt(path: Path) -> Iterator[str]:
    with _open_text(path) as fh:
        for line in fh:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line


def _read_csv(path: Path) -> Iterator[str]:
    with _open_text(path) as fh:
        reader = csv.DictReader(fh)
        fields = [f.strip() for f in (reader.fieldnames or [])]
        if "url" not in fields:
            raise _missing_url_column(path, fields)
        reader.fieldnames = fields
        for row in reader:
            value = (row.get("url") or "").strip()
            if value:
                yield value


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    if "url" not in pf.schema_arrow.names:
        raise _missing_url_column(path, pf.schema_arrow.names)
    for batch in pf.iter_batches(columns=["url"]):
        for value in batch.column(0).to_pylist():
            if value is not None and str(value).strip():
                yield str(value).strip()


def read_url_list(path: Path) -> Iterator[str]:
    """URLs of a list file: .txt (one a line; blank and '#' lines skipped), .csv or .parquet
    with a ``url`` column; ``.gz`` text/CSV files are read transparently."""
    path = Path(path)
    readers = {"txt": _read_txt, "csv": _read_csv, "parquet": _read_parquet}
    return readers[_list_kind(path)](path)


# --------------------------------------------------------------------------- WARC


class _ImgParser(HTMLParser):
    """Collects ``<base href>`` (the first one) and every ``<img src>``."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.base: str | None = None
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k.lower(): v for k, v in attrs if v is not None}
        if tag == "base" and self.base is None and values.get("href", "").strip():
            self.base = values["href"].strip()
        elif tag == "img" and values.get("src", "").strip():
            self.srcs.append(values["src"].strip())

    handle_startendtag = handle_starttag


def html_image_urls(html: str, page_url: str) -> list[str]:
    """Absolute URLs of a page's ``<img src>``, honouring ``<base href>``; data: URIs skipped."""
    parser = _ImgParser()
    parser.feed(html)
    parser.close()
    base = urljoin(page_url, parser.base) if parser.base else page_url
    urls = []
    for src in parser.srcs:
        if src.lower().startswith("data:"):
            continue
        urls.append(urljoin(base, src))
    return urls


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def _charset(content_type: str | None) -> str:
    for part in (content_type or "").split(";")[1:]:
        key, _, value = part.partition("=")
        if key.strip().lower() == "charset" and value.strip():
            return value.strip().strip("\"'")
    return "utf-8"


def _decode_html(body: bytes, content_type: str | None) -> str:
    try:
        return body.decode(_charset(content_type), errors="replace")
    except LookupError:  # unknown charset name
        return body.decode("utf-8", errors="replace")


def _has_image_extension(url: str) -> bool:
    return Path(urlsplit(url).path).suffix.lower() in IMAGE_EXTENSIONS


def _record_uri(record) -> str:
    return (record.rec_headers.get_header("WARC-Target-URI") or "").strip().strip("<>")


def _record_status(record) -> int | None:
    if record.http_headers is None:
        return None
    try:
        return int(record.http_headers.get_statuscode())
    except (TypeError, ValueError):
        return None


def _record_content_type(record) -> str | None:
    if record.http_headers is not None:
        return record.http_headers.get_header("Content-Type")
    return record.rec_headers.get_header("Content-Type")


def _is_image_record(record, uri: str) -> bool:
    status = _record_status(record)
    if _media_type(_record_content_type(record)).startswith("image/"):
        return True
    return _has_image_extension(uri) and (status == 200 or record.rec_type == "resource")


def _is_html_page(record) -> bool:
    status = _record_status(record)
    ok = status is None or 200 <= status < 300
    return ok and _media_type(_record_content_type(record)) in ("text/html", "application/xhtml+xml")


def _warc_record_items(it: ArchiveIterator, record, warc_path: str) -> Iterator[InputItem]:
    uri = _record_uri(record)
    if record.rec_type not in ("response", "resource") or not uri:
        return
    if _is_image_record(record, uri):
        yield InputItem(image_id_for(uri), uri, "warc", f"{warc_path}#{it.get_record_offset()}")
    elif _is_html_page(record):
        body = record.content_stream().read(MAX_HTML_BYTES)
        for url in html_image_urls(_decode_html(body, _record_content_type(record)), uri):
            yield InputItem(image_id_for(url), url, "url", None)


def iter_warc_items(warc_path: Path) -> Iterator[InputItem]:
    """Image records (origin 'warc') and the ``<img src>`` URLs of HTML pages (origin 'url')."""
    path = str(warc_path)
    with open(path, "rb") as fh:
        it = ArchiveIterator(fh)
        for record in it:
            yield from _warc_record_items(it, record, path)


def _split_locator(item: InputItem) -> tuple[str, int]:
    if item.origin != "warc" or not item.locator or "#" not in item.locator:
        raise ValueError(f"item {item.url!r} is not a WARC item with a '<path>#<offset>' locator")
    path, _, offset = item.locator.rpartition("#")
    return path, int(offset)


def _with_warc_record(item: InputItem, read):
    path, offset = _split_locator(item)
    with open(path, "rb") as fh:
        fh.seek(offset)
        for record in ArchiveIterator(fh):
            return read(record)
    raise ValueError(f"no WARC record at offset {offset} of {path}")


def warc_http_status(item: InputItem) -> int | None:
    """The HTTP status of a WARC item's record (None when the record has no HTTP headers)."""
    return _with_warc_record(item, _record_status)


def load_item_bytes(item: InputItem) -> bytes:
    """The stored bytes of a 'warc' item (the record's payload) or a 'file' item."""
    if item.origin == "file":
        if not item.locator:
            raise ValueError(f"file item {item.url!r} has no locator")
        return Path(item.locator).read_bytes()
    if item.origin == "warc":
        return _with_warc_record(item, lambda record: record.content_stream().read())
    raise ValueError(f"item {item.url!r} has origin {item.origin!r}; only 'warc' and 'file' items hold bytes")


# --------------------------------------------------------------------------- folders


def iter_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive; hidden files/dirs skipped), sorted by relative path."""
    folder = Path(folder)
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


# --------------------------------------------------------------------------- sources


def _fix_hint() -> str:
    return "relative paths in the config resolve against the YAML file's directory"


def _missing(source: Source, what: str, key: str) -> FileNotFoundError:
    """The error for an input that is not there: names the source, the path and the key to fix."""
    return FileNotFoundError(f"source {source.name!r}: {what}; fix `{key}:` of this source ({_fix_hint()})")


def _check_urls(source: Source) -> Path | None:
    if source.urls is None:
        return None
    path = Path(source.urls)
    if not path.is_file():
        raise _missing(source, f"URL list {path} does not exist", "urls")
    return path


def _warc_files(source: Source) -> list[Path]:
    files: list[Path] = []
    seen: set[str] = set()
    for pattern in source.warc:
        matches = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matches:
            raise _missing(source, f"WARC glob {pattern!r} matches no file", "warc")
        for match in matches:
            key = os.path.abspath(match)
            if key not in seen:
                seen.add(key)
                files.append(Path(match))
    return files


def _check_images(source: Source) -> Path | None:
    if source.images is None:
        return None
    folder = Path(source.images)
    if not folder.is_dir():
        raise _missing(source, f"image folder {folder} does not exist", "images")
    return folder


def _raw_items(source: Source) -> Iterator[InputItem]:
    urls, warcs, images = _check_urls(source), _warc_files(source), _check_images(source)
    if urls is not None:
        for url in read_url_list(urls):
            yield InputItem(image_id_for(url), url, "url", None)
    for warc in warcs:
        yield from iter_warc_items(warc)
    if images is not None:
        for path in iter_image_files(images):
            resolved = path.resolve()
            uri = resolved.as_uri()
            yield InputItem(image_id_for(uri), uri, "file", str(resolved))


def iter_source_items(source: Source) -> Iterator[InputItem]:
    """Every input of ``source`` (URL list, then WARCs, then the folder), each image_id once."""
    seen: set[str] = set()
    for item in _raw_items(source):
        if item.image_id not in seen:
            seen.add(item.image_id)
            yield item


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_inputs(source: Source) -> list[tuple[str, Path]]:
    """(name relative to the source's inputs, path) of every input file."""
    entries = []
    urls = _check_urls(source)
    if urls is not None:
        entries.append((f"urls/{urls.name}", urls))
    entries += [(f"warc/{p.name}", p) for p in _warc_files(source)]
    images = _check_images(source)
    if images is not None:
        entries += [(f"images/{p.relative_to(images).as_posix()}", p) for p in iter_image_files(images)]
    return sorted(entries, key=lambda e: (e[0], str(e[1])))


def source_digest(source: Source) -> str:
    """Hex sha256 over (relative name, size, content sha256) of every input file, sorted.

    Independent of absolute paths; changes when any content, file name or the image set changes.
    """
    h = hashlib.sha256()
    for name, path in _digest_inputs(source):
        line = json.dumps([name, path.stat().st_size, _file_sha256(path)], separators=(",", ":"))
        h.update(line.encode("utf-8") + b"\n")
    return h.hexdigest()


__all__ = [
    "IMAGE_EXTENSIONS",
    "InputItem",
    "html_image_urls",
    "image_id_for",
    "iter_image_files",
    "iter_source_items",
    "iter_warc_items",
    "load_item_bytes",
    "read_url_list",
    "source_digest",
    "warc_http_status",
]
