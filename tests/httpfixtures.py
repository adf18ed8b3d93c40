"""A local aiohttp test web server (127.0.0.1, random free port) run in a background thread.

It counts requests per path, records user agents and the peak number of requests in flight.
Paths:
  /robots.txt            ``server.robots``: None → 404, int → that status, "redirect:<loc>" → 302,
                         other str → 200 with that text
  paths in ``server.texts``  200 text/plain with the mapped text
  /img.jpg, anything else  200 with a small JPEG
  /status/<code>         that status
  /flaky/<n>             503 for the first n requests, then 200
  /retry-after/<value>   429 with ``Retry-After: <value>`` on the first request, then 200
  /slow/<seconds>        sleeps, then 200
  /big/<n>?cl=1|0        n bytes, with or without Content-Length (chunked)
  /redirect/<n>          n redirects, then 200
  /loop/a, /loop/b       redirect to each other
  /goto?to=<location>    302 to location
  /xrobots?v=<value>     200 with ``X-Robots-Tag: <value>``
  /concurrent            sleeps 0.2 s, tracking requests in flight
"""
from __future__ import annotations

import asyncio
import io
import threading
from collections import Counter
from collections.abc import Iterator

from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.fetch import Fetcher, FetchResult


def small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (200, 30, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _redirect(location: str) -> web.Response:
    return web.Response(status=302, headers={"Location": location})


class LocalServer:
    """The test server; configure ``robots`` before fetching, read counters afterwards."""

    def __init__(self) -> None:
        self.robots: str | int | None = None
        self.texts: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self.inflight = 0
        self.max_inflight = 0
        self.image = small_jpeg()
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _ok(self, **headers: str) -> web.Response:
        return web.Response(body=self.image, content_type="image/jpeg", headers=headers)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.counts[path] += 1
        self.user_agents.append(request.headers.get("User-Agent", ""))
        parts = path.strip("/").split("/")
        head, arg = parts[0], parts[1] if len(parts) > 1 else ""
        n = self.counts[path]
        if path == "/robots.txt":
            return self._robots()
        if path in self.texts:
            return web.Response(text=self.texts[path])
        if head == "status":
            return web.Response(status=int(arg), text="status")
        if head == "flaky":
            return web.Response(status=503, text="busy") if n <= int(arg) else self._ok()
        if head == "retry-after":
            return web.Response(status=429, headers={"Retry-After": arg}) if n == 1 else self._ok()
        if head == "slow":
            await asyncio.sleep(float(arg))
            return self._ok()
        if head == "big":
            return await self._big(request, int(arg))
        if head == "redirect":
            return self._ok() if int(arg) == 0 else _redirect(f"/redirect/{int(arg) - 1}")
        if head == "loop":
            return _redirect("/loop/b" if arg == "a" else "/loop/a")
        if head == "goto":
            return _redirect(request.query["to"])
        if head == "xrobots":
            return self._ok(**{"X-Robots-Tag": request.query["v"]})
        if head == "concurrent":
            return await self._concurrent()
        return self._ok()

    def _robots(self) -> web.Response:
        if self.robots is None:
            return web.Response(status=404, text="not found")
        if isinstance(self.robots, int):
            return web.Response(status=self.robots, text="robots status")
        if self.robots.startswith("redirect:"):
            return _redirect(self.robots.removeprefix("redirect:"))
        return web.Response(text=self.robots)

    async def _big(self, request: web.Request, size: int) -> web.StreamResponse:
        if request.query.get("cl") == "1":
            return web.Response(body=b"x" * size, content_type="image/jpeg")
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    async def _concurrent(self) -> web.Response:
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.2)
        finally:
            self.inflight -= 1
        return self._ok()


@pytest.fixture
def server() -> Iterator[LocalServer]:
    """A fresh local server per test (fresh counters, fresh robots.txt)."""
    srv = LocalServer()
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def make_cfg(**kw: Any) -> IngestConfig:
    """Test defaults: loopback allowed, short timeouts and backoff."""
    base: dict[str, Any] = {"allow_private_addresses": True, "timeout_s": 3.0, "retries": 2, "backoff_s": 0.01}
    base.update(kw)
    return IngestConfig(**base)


async def fetch_all(cfg: IngestConfig, urls: list[str], resolver: AbstractResolver | None = None) -> tuple[list[FetchResult], int]:
    async with Fetcher(cfg, resolver=resolver) as f:
        results = await asyncio.gather(*(f.fetch(u) for u in urls))
        return list(results), f.requests_made


def fetch_one(cfg: IngestConfig, url: str) -> FetchResult:
    results, _ = asyncio.run(fetch_all(cfg, [url]))
    return results[0]
