"""Thumbnails: made once from the stored bytes, cached under ``<root>/dashboard/thumbs/``.

Only the locator decides what may be shown (see ``index.py``): uncurated images come from
``face_blur``'s blurred bytes and only once ``nsfw`` kept them; anything else gets the grey
placeholder, made here without ever reading the image. A thumbnail is written under a temporary
name and renamed into place; images of one shard are made together (one read of the shard's
image column), and at most ``MAX_SHARD_READS`` shards are read at once to bound memory.
"""
from __future__ import annotations

import io
import logging
import os
import threading
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from pipeline.dashboard.index import SHOW_CLEAR, Locator
from pipeline.dashboard.tables import find_sorted, id_array

log = logging.getLogger("lvd")

THUMB_SIDE = 256
THUMB_QUALITY = 82
MAX_SHARD_READS = 2
PLACEHOLDER_GREY = (128, 128, 128)


def placeholder_png(side: int = THUMB_SIDE) -> bytes:
    """A plain grey square: what NSFW-removed and unscreened images are shown as."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), PLACEHOLDER_GREY).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def make_thumbnail(data: bytes, side: int = THUMB_SIDE) -> bytes:
    """JPEG thumbnail (longer side ``side``) of encoded image bytes."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (side, side))  # JPEG: decode at a reduced scale
        img = img.convert("RGB")
        img.thumbnail((side, side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=THUMB_QUALITY, optimize=True)
        return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ThumbStore:
    """Cached thumbnails of one run, made on first request (or when a page asks for a prefetch)."""

    def __init__(self, root: Path):
        self.dir = Path(root) / "dashboard" / "thumbs"
        self.placeholder = placeholder_png()
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()
        self._reads = threading.BoundedSemaphore(MAX_SHARD_READS)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lvd-thumbs")

    def path(self, loc: Locator, i: int) -> Path:
        """Cache path of the thumbnail of locator row ``i`` (keyed by the unit its bytes come from)."""
        image_id = loc.ids[i].decode()
        return self.dir / loc.units[loc.shard[i]] / image_id[:2] / f"{image_id}.jpg"

    def get(self, loc: Locator, image_id: str) -> Path | bytes | None:
        """The thumbnail file, the placeholder bytes, or None for an unknown id."""
        i = loc.find(image_id)
        if i is None:
            return None
        if loc.show[i] != SHOW_CLEAR:
            return self.placeholder
        path = self.path(loc, i)
        if not path.is_file():
            self.ensure(loc, [i])
        return path if path.is_file() else self.placeholder

    def prefetch(self, loc: Locator, image_ids: list[str]) -> None:
        """Make the thumbnails of a page's images in the background, one read per shard."""
        rows = [i for i in (find_sorted(loc.ids, x) for x in image_ids) if i is not None and loc.show[i] == SHOW_CLEAR]
        missing = [i for i in rows if not self.path(loc, i).is_file()]
        if missing:
            self._pool.submit(self._ensure_logged, loc, missing)

    def _ensure_logged(self, loc: Locator, rows: list[int]) -> None:
        try:
            self.ensure(loc, rows)
        except Exception:  # noqa: BLE001 - a background prefetch must not die silently
            log.exception("dashboard: thumbnail prefetch failed")

    def ensure(self, loc: Locator, rows: list[int]) -> None:
        """Make the missing thumbnails of the given locator rows (grouped by shard)."""
        by_shard: dict[int, list[int]] = defaultdict(list)
        for i in rows:
            if loc.show[i] == SHOW_CLEAR and not self.path(loc, i).is_file():
                by_shard[int(loc.shard[i])].append(i)
        for shard, members in by_shard.items():
            with self._shard_lock(loc.shards[shard]):
                todo = [i for i in members if not self.path(loc, i).is_file()]
                if todo:
                    self._make(loc, shard, todo)

    def _shard_lock(self, key: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks[key]

    def _make(self, loc: Locator, shard: int, rows: list[int]) -> None:
        with self._reads:
            f = pq.ParquetFile(loc.shards[shard])
            try:
                t = f.read(columns=["image_id", "image"])
            finally:
                f.close()
        ids = id_array(t["image_id"])
        for i in rows:
            r = int(loc.row[i])
            if r >= len(ids) or ids[r] != loc.ids[i]:
                log.warning("dashboard: %s is not at row %d of %s; index out of date?", loc.ids[i], r, loc.shards[shard])
                continue
            data = t["image"][r].as_py()
            try:
                _atomic_write(self.path(loc, i), make_thumbnail(data))
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                log.warning("dashboard: no thumbnail for %s: %s", loc.ids[i].decode(), err)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
