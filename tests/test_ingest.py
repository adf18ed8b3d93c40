"""`ingest` end to end through the engine, against a real HTTP server on loopback."""
from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from aiohttp import web
import pyarrow.parquet as pq
from PIL import Image
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from pipeline.config import parse_config
from pipeline.engine import Engine
from pipeline.sources import image_id_for


def _jpeg(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")
    return buf.getvalue()


class Site:
    """An aiohttp site in a background thread that counts requests per path."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.flaky = 0
        self.jpeg = _jpeg(1)
        self.bomb = _bomb_png()
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        self.hits[path] += 1
        jpeg = {"Content-Type": "image/jpeg"}
        if path == "/robots.txt":
            return web.Response(text="User-agent: *\nDisallow: /private/\n")
        if path.startswith("/paced/"):
            await asyncio.sleep(0.05)
            return web.Response(body=_jpeg(int(path.split("/")[-1].split(".")[0])), headers=jpeg)
        if path.startswith("/img/"):
            return web.Response(body=_jpeg(int(path.split("/")[-1].split(".")[0])), headers=jpeg)
        if path == "/missing.jpg":
            return web.Response(status=404)
        if path == "/error.jpg":
            return web.Response(status=500)
        if path == "/flaky.jpg":
            self.flaky += 1
            return web.Response(status=503) if self.flaky <= 1 else web.Response(body=self.jpeg, headers=jpeg)
        if path == "/slow.jpg":
            await asyncio.sleep(3)
            return web.Response(body=self.jpeg, headers=jpeg)
        if path == "/truncated.jpg":
            return web.Response(body=self.jpeg[: len(self.jpeg) // 2], headers=jpeg)
        if path == "/page.jpg":
            return web.Response(body=b"<html><body>not an image</body></html>", headers=jpeg)
        if path == "/bomb.png":
            return web.Response(body=self.bomb, headers={"Content-Type": "image/png"})
        if path == "/huge.jpg":
            return web.Response(body=b"\xff" * 300_000, headers=jpeg)
        if path in ("/loop-a", "/loop-b"):
            return web.Response(status=302, headers={"Location": "/loop-b" if path == "/loop-a" else "/loop-a"})
        if path == "/redirect.jpg":
            return web.Response(status=301, headers={"Location": "/img/7.jpg"})
        if path == "/noai.jpg":
            return web.Response(body=self.jpeg, headers={**jpeg, "X-Robots-Tag": "noai"})
        if path.startswith("/private/"):
            return web.Response(body=self.jpeg, headers=jpeg)
        return web.Response(status=404)

    def __enter__(self) -> "Site":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        asyncio.run_coroutine_threadsafe(site.start(), self.loop).result()
        self.port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


EXPECTED = {
    "/img/1.jpg": "ok", "/img/2.jpg": "ok", "/img/3.jpg": "ok", "/redirect.jpg": "ok", "/flaky.jpg": "ok",
    "/missing.jpg": "http_error", "/error.jpg": "http_error", "/slow.jpg": "timeout",
    "/truncated.jpg": "decode_error", "/page.jpg": "not_an_image", "/bomb.png": "decompression_bomb",
    "/huge.jpg": "too_large", "/loop-a": "redirect_loop", "/noai.jpg": "opted_out",
    "/private/secret.jpg": "robots_disallowed",
}


def _config(tmp_path: Path, site: Site, allow_private=True, extra_sources=None, **ingest):
    urls = tmp_path / "urls.txt"
    lines = [site.url + p for p in EXPECTED] + [site.url + "/img/1.jpg", "not a url", "ftp://example.com/x.jpg"]
    urls.write_text("\n".join(lines) + "\n")
    sources = {"uncurated": [{"name": "web", "urls": str(urls)}]}
    sources.update(extra_sources or {})
    settings = {"allow_private_addresses": allow_private, "timeout_s": 1.5, "retries": 2, "backoff_s": 0.05,
                "max_bytes": 200_000, "max_pixels": 50_000_000, "max_side": 32, **ingest}
    return parse_config({"root": str(tmp_path / "run"), "sources": sources, "ingest": settings,
                         "engine": {"shard_rows": 4}}, base=tmp_path)


@pytest.fixture
def site():
    with Site() as s:
        yield s


def test_every_url_accounted_for_with_its_status(tmp_path, site):
    eng = Engine(_config(tmp_path, site), show_progress=False)
    st = eng.ensure("ingest")
    assert st.state == "done"
    t = eng.read_table("ingest").to_pylist()
    by_url = {r["url"]: r for r in t}
    # exactly once each (the duplicate line of /img/1.jpg collapses), nothing lost
    assert len(t) == len(by_url) == len(EXPECTED) + 2
    for path, status in EXPECTED.items():
        assert by_url[site.url + path]["status"] == status, (path, by_url[site.url + path])
    assert by_url["not a url"]["status"] == "invalid_url"
    assert by_url["ftp://example.com/x.jpg"]["status"] == "unsupported_scheme"
    for r in t:
        assert r["image_id"] == image_id_for(r["url"]) and r["source"] == "web" and r["kind"] == "uncurated"
        if r["status"] == "ok":
            assert max(r["width"], r["height"]) <= 32 and r["image"][:2] == b"\xff\xd8" and len(r["sha256"]) == 64
        else:
            assert r["image"] is None and r["error"]
    assert site.hits["/private/secret.jpg"] == 0 and site.hits["/robots.txt"] == 1
    assert st.counts["status"]["ok"] == 5


def test_second_run_sends_no_request(tmp_path, site):
    cfg = _config(tmp_path, site)
    Engine(cfg, show_progress=False).ensure("ingest")
    before = sum(site.hits.values())
    st = Engine(cfg, show_progress=False).ensure("ingest")
    assert not st.computed and sum(site.hits.values()) == before


def test_private_address_refused_without_flag(tmp_path, site):
    eng = Engine(_config(tmp_path, site, allow_private=False), show_progress=False)
    eng.ensure("ingest")
    statuses = Counter(r["status"] for r in eng.read_table("ingest", columns=["status"]).to_pylist())
    assert statuses["private_address"] == len(EXPECTED) + 0  # every loopback URL; robots too
    assert sum(site.hits.values()) == 0


def test_throughput_settings_do_not_change_fingerprint(tmp_path, site):
    a = Engine(_config(tmp_path, site), show_progress=False).stage_fingerprint("ingest")
    b = Engine(_config(tmp_path, site, concurrency=7, per_host_concurrency=1), show_progress=False)
    assert b.stage_fingerprint("ingest") == a
    c = Engine(_config(tmp_path, site, max_side=64), show_progress=False)
    assert c.stage_fingerprint("ingest") != a


def _warc(path: Path, base: str) -> None:
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=True)
        body = _jpeg(99)
        http = StatusAndHeaders("200 OK", [("Content-Type", "image/jpeg")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"{base}/archived.jpg", "response", payload=io.BytesIO(body),
                                            http_headers=http))
        html = f'<html><img src="/img/11.jpg"><img src="{base}/img/12.jpg"></html>'.encode()
        http = StatusAndHeaders("200 OK", [("Content-Type", "text/html")], protocol="HTTP/1.1")
        w.write_record(w.create_warc_record(f"{base}/gallery.html", "response", payload=io.BytesIO(html),
                                            http_headers=http))


def test_warc_and_folder_sources_and_incremental_partitions(tmp_path, site):
    _warc(tmp_path / "crawl.warc.gz", site.url)
    folder = tmp_path / "curated"
    folder.mkdir()
    for i in range(3):
        (folder / f"c{i}.jpg").write_bytes(_jpeg(200 + i, size=(40, 30)))
    base = {"uncurated": [{"name": "arch", "warc": [str(tmp_path / "*.warc.gz")]}]}
    eng = Engine(_config(tmp_path, site, extra_sources=base), show_progress=False)
    eng.ensure("ingest")
    arch = {r["url"]: r for r in eng.read_table("ingest", partition="arch").to_pylist()}
    assert {u: r["status"] for u, r in arch.items()} == {
        f"{site.url}/archived.jpg": "ok", f"{site.url}/img/11.jpg": "ok", f"{site.url}/img/12.jpg": "ok"}
    assert arch[f"{site.url}/archived.jpg"]["origin"] == "warc" and site.hits["/archived.jpg"] == 0
    hits = sum(site.hits.values())
    # adding a curated folder computes only that partition: no HTTP request, web/arch reused
    more = {**base, "curated": [{"name": "mine", "images": str(folder)}]}
    eng2 = Engine(_config(tmp_path, site, extra_sources=more), show_progress=False)
    before = {u.partition.name: u.fingerprint for u in eng.units("ingest")}
    after = {u.partition.name: u.fingerprint for u in eng2.units("ingest")}
    assert before == {k: v for k, v in after.items() if k != "mine"}
    eng2.ensure("ingest")
    assert sum(site.hits.values()) == hits
    mine = eng2.read_table("ingest", partition="mine").to_pylist()
    assert len(mine) == 3 and {r["status"] for r in mine} == {"ok"} and {r["kind"] for r in mine} == {"curated"}
    assert all(r["url"].startswith("file://") and r["origin"] == "file" for r in mine)


def _paced_config(tmp_path: Path, site: Site, name: str) -> Path:
    urls = tmp_path / "paced.txt"
    urls.write_text("".join(f"{site.url}/paced/{i}.jpg\n" for i in range(60)))
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(f"root: {name}\nsources: {{uncurated: [{{name: web, urls: paced.txt}}]}}\n"
                   "engine: {shard_rows: 6}\n"
                   "ingest: {allow_private_addresses: true, per_host_concurrency: 2, shards_in_flight: 1, max_side: 32}\n")
    return cfg


def _lvd(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "stage", "ingest", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _unit_manifest(stage_dir: Path) -> dict:
    """The manifest of the (single) unit directory, not of the stage-level view."""
    found = [json.loads(p.read_text()) for p in stage_dir.glob("*/_manifest.json")]
    return next(m for m in found if "content" in m)


def test_killed_crawl_resumes_without_refetching_and_equals_clean_run(tmp_path, site):
    cfg = _paced_config(tmp_path, site, "killed")
    proc = _lvd(cfg)
    stages = tmp_path / "killed" / "stages" / "ingest"
    deadline = time.time() + 60
    while time.time() < deadline and len(list(stages.glob("*/part-*.parquet"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    done = list(stages.glob("*/part-*.parquet"))
    assert 3 <= len(done) < 10, "kill landed mid-stage"
    assert not list(stages.glob("*/_manifest.json"))
    fetched_before = {p for p, n in site.hits.items() if p.startswith("/paced/")}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "stage", "ingest", "--config", str(cfg)], check=True,
                   capture_output=True, timeout=120)
    # URLs of finished shards were not fetched again; every URL fetched at most twice overall
    finished_ids = set()
    for p in done:
        finished_ids |= set(pq.read_table(p, columns=["url"])["url"].to_pylist())
    for url in finished_ids:
        assert site.hits[url.replace(site.url, "")] == 1, url
    assert fetched_before and all(site.hits[p] <= 2 for p in site.hits if p.startswith("/paced/"))
    clean = _paced_config(tmp_path, site, "clean")
    subprocess.run([sys.executable, "-m", "pipeline.cli", "stage", "ingest", "--config", str(clean)], check=True,
                   capture_output=True, timeout=120)
    m_killed, m_clean = (_unit_manifest(d) for d in (stages, tmp_path / "clean" / "stages" / "ingest"))
    assert m_killed["fingerprint"] == m_clean["fingerprint"] and m_killed["rows"] == 60
    assert [s["sha256"] for s in m_killed["shards"]] == [s["sha256"] for s in m_clean["shards"]]
