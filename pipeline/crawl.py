"""Turn input items (URLs, WARC records, local files) into rows of the images table.

One asyncio event loop (in a background thread) drives every fetch of the shards it is given,
so the per-host and overall concurrency limits and the robots.txt cache are shared by all of
them; decoding runs in a process pool. Completed shards are handed back in completion order,
so the engine can write each one as soon as it is finished.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import os
import queue
import threading
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from pipeline.config import IngestConfig
from pipeline.fetch import Fetcher
from pipeline.imaging import DecodedImage, decode_and_encode
from pipeline.sources import InputItem, load_item_bytes
from pipeline.tables import images_table

log = logging.getLogger("lvd")


@dataclass(frozen=True)
class CrawlShard:
    """A shard of input items with the source they belong to."""

    index: int
    items: tuple[InputItem, ...]


_DONE = object()
SMALL_JOB = 64  # below this many items, decode in threads: a process pool costs more to start than it saves


class _Crawl:
    """State of one crawl: config, source labels, fetcher, decode pool, progress callback."""

    def __init__(self, cfg: IngestConfig, source: str, kind: str, fetcher: Fetcher, pool: Executor,
                 workers: int, on_item: Callable[[str], None]):
        self.cfg, self.source, self.kind = cfg, source, kind
        self.fetcher, self.pool, self.on_item = fetcher, pool, on_item
        # Items between "start fetching" and "decoded": bounds the bodies held in memory when
        # downloads outpace decoding (fetch slots + a short queue per decode worker).
        self.backlog = asyncio.Semaphore(cfg.concurrency + 2 * workers)
        self.decode = functools.partial(decode_and_encode, max_pixels=cfg.max_pixels, max_side=cfg.max_side,
                                        fmt=cfg.encode_format, quality=cfg.encode_quality)

    def _row(self, item: InputItem, **fields: Any) -> dict:
        row = {"image_id": item.image_id, "url": item.url, "source": self.source, "kind": self.kind,
               "origin": item.origin}
        row.update(fields)
        return row

    async def _body(self, item: InputItem) -> tuple[bytes | None, dict]:
        """The item's bytes, or None and the row fields explaining why there are none."""
        if item.origin == "url":
            res = await self.fetcher.fetch(item.url)
            meta = {"final_url": res.final_url, "http_status": res.http_status}
            if res.status != "ok":
                return None, {**meta, "status": res.status, "error": res.error}
            return res.body, meta
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, load_item_bytes, item), {}
        except (OSError, ValueError) as err:
            return None, {"status": "read_error", "error": f"{type(err).__name__}: {err}"}

    async def item(self, item: InputItem) -> dict:
        """Exactly one row for the item, whatever happens."""
        try:
            async with self.backlog:
                body, meta = await self._body(item)
                if body is None:
                    row = self._row(item, **meta)
                else:
                    row = self._row(item, **meta, **_decoded_fields(await self._decode(body)))
        except Exception as err:  # noqa: BLE001 - an item is never dropped: record the failure
            log.exception("unexpected error on %s", item.url)
            row = self._row(item, status="internal_error", error=f"{type(err).__name__}: {err}")
        self.on_item(row["status"])
        return row

    async def _decode(self, body: bytes) -> DecodedImage:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self.decode, body)

    async def shard(self, shard: CrawlShard) -> tuple[int, pa.Table]:
        rows = await asyncio.gather(*(self.item(it) for it in shard.items))
        return shard.index, images_table(list(rows))


def _decoded_fields(d: DecodedImage) -> dict:
    return {"status": d.status, "error": d.error, "image": d.image, "width": d.width, "height": d.height,
            "sha256": d.sha256}


def _make_pool(workers: int, items: int) -> Executor:
    """Decode workers: processes (only `pipeline.imaging` preloaded); threads for tiny jobs."""
    if items <= SMALL_JOB:
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.imaging"])
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


async def _crawl(cfg: IngestConfig, source: str, kind: str, shards: list[CrawlShard],
                 out: "queue.Queue[Any]", on_item: Callable[[str], None]) -> None:
    gate = asyncio.Semaphore(cfg.shards_in_flight)
    loop = asyncio.get_running_loop()
    workers = cfg.decode_workers or os.cpu_count() or 1
    with _make_pool(workers, sum(len(s.items) for s in shards)) as pool:
        async with Fetcher(cfg) as fetcher:
            crawl = _Crawl(cfg, source, kind, fetcher, pool, workers, on_item)

            async def one(shard: CrawlShard) -> None:
                async with gate:
                    result = await crawl.shard(shard)
                await loop.run_in_executor(None, out.put, result)

            await asyncio.gather(*(one(s) for s in shards))
            log.debug("crawl of %s made %d HTTP requests", source, fetcher.requests_made)


def crawl_shards(cfg: IngestConfig, source: str, kind: str, shards: list[CrawlShard],
                 on_item: Callable[[str], None] = lambda status: None) -> Iterator[tuple[int, pa.Table]]:
    """Crawl and decode the given shards; yield ``(index, images table)`` as each completes."""
    if not shards:
        return
    out: queue.Queue[Any] = queue.Queue(maxsize=2)
    loop = asyncio.new_event_loop()
    main: asyncio.Task | None = None
    error: list[BaseException] = []

    def run() -> None:
        nonlocal main
        asyncio.set_event_loop(loop)
        main = loop.create_task(_crawl(cfg, source, kind, shards, out, on_item))
        try:
            loop.run_until_complete(main)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(err)
        finally:
            loop.close()
            out.put(_DONE)

    thread = threading.Thread(target=run, name=f"crawl-{source}", daemon=True)
    thread.start()
    try:
        while True:
            got = out.get()
            if got is _DONE:
                break
            yield got
        if error and not isinstance(error[0], asyncio.CancelledError):
            raise error[0]
    finally:
        if thread.is_alive():
            if main is not None and not loop.is_closed():
                loop.call_soon_threadsafe(main.cancel)
            while thread.is_alive():
                try:
                    out.get(timeout=0.1)
                except queue.Empty:
                    pass
            thread.join()
