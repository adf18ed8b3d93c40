"""A local image server for the benchmarks: files of one folder, held in memory, on 127.0.0.1.

Run as ``python benchmarks/_serve.py --dir DIR [--port 0]``; prints ``READY <port>`` on stdout
once it listens, then serves until SIGTERM/SIGINT.

    /robots.txt    allows everything
    /img/<name>    the file <name> of DIR (image/jpeg), 404 if absent
    /_stats        JSON: requests, bytes sent and statuses since start or the last /_reset
    /_reset        zero those counters

One asyncio process (aiohttp) serving bytes from memory keeps the server's own cost per request
small, so the crawlers under test, not the server, are what is measured. Requests to /_stats and
/_reset are not counted.
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import Counter
from pathlib import Path

from aiohttp import web

ROBOTS = b"User-agent: *\nAllow: /\n"


class Site:
    def __init__(self, folder: Path):
        self.files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpg", ".jpeg")}
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.bytes_sent = 0
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.by_user_agent: Counter[str] = Counter()
        self.peak_in_flight = 0
        self.in_flight = 0

    def count(self, request: web.Request, kind: str, status: int, nbytes: int) -> None:
        self.requests += 1
        self.bytes_sent += nbytes
        self.by_kind[kind] += 1
        self.by_status[status] += 1
        self.by_user_agent[request.headers.get("User-Agent", "-")[:80]] += 1

    async def robots(self, request: web.Request) -> web.Response:
        self.count(request, "robots", 200, len(ROBOTS))
        return web.Response(body=ROBOTS, content_type="text/plain")

    async def image(self, request: web.Request) -> web.Response:
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            body = self.files.get(request.match_info["name"])
            if body is None:
                self.count(request, "missing", 404, 0)
                return web.Response(status=404, text="not found")
            self.count(request, "image", 200, len(body))
            return web.Response(body=body, content_type="image/jpeg")
        finally:
            self.in_flight -= 1

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "requests": self.requests,
            "bytes_sent": self.bytes_sent,
            "by_kind": dict(self.by_kind),
            "by_status": {str(k): v for k, v in self.by_status.items()},
            "by_user_agent": dict(self.by_user_agent),
            "files": len(self.files),
        })

    async def reset_view(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})


async def serve(folder: Path, host: str, port: int) -> None:
    site = Site(folder)
    app = web.Application()
    app.router.add_get("/robots.txt", site.robots)
    app.router.add_get("/img/{name}", site.image)
    app.router.add_get("/_stats", site.stats)
    app.router.add_get("/_reset", site.reset_view)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, host, port, backlog=2048, reuse_address=True)
    await tcp.start()
    bound = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(f"READY {bound} {len(site.files)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", required=True, type=Path, help="folder of .jpg files served under /img/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on READY)")
    args = p.parse_args()
    asyncio.run(serve(args.dir, args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
