"""The dashboard over HTTP (a real uvicorn server on 127.0.0.1; raw request paths): every page renders,
GET/HEAD only, files only from inside the run root, 404 pages for bad ids, no tracebacks."""
from __future__ import annotations

import http.client
import threading
from pathlib import Path

import pytest
import uvicorn
from fastapi.testclient import TestClient

from pipeline.cli import build_parser
from pipeline.config import load_config
from pipeline.dashboard import create_app
from pipeline.dashboard.thumbs import placeholder_png
from prefect_server import free_port, wait_until

WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


class Served:
    """The app in a uvicorn server on a background thread, on a free loopback port."""

    def __init__(self, app):
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "Served":
        self.thread.start()
        wait_until(lambda: self.server.started, 60, "the dashboard server", alive=self.thread.is_alive)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def request(self, path: str, method: str = "GET", headers: dict | None = None) -> tuple[int, dict, bytes]:
        """One request with ``path`` sent verbatim (no client-side normalisation of ``..``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, headers=headers or {})
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def site(demo_run):
    cfg, _ = demo_run
    app = create_app(load_config(cfg))
    with Served(app) as served:
        served.data = app.state.data
        yield served


def _ids(site):
    eng = site.data.engine
    retrieve = eng.read_table("retrieve").to_pylist()
    nsfw = [r["image_id"] for r in eng.read_table("nsfw").to_pylist() if r["decision"] == "removed"]
    member = eng.read_table("cluster", columns=["image_id"])["image_id"][0].as_py()
    return {"query": next(r["query_id"] for r in retrieve if r["query_id"]), "retrieved": retrieve[0]["image_id"],
            "nsfw": nsfw[0], "member": member}


def test_every_page_renders(site) -> None:
    ids = _ids(site)
    manifest = next(u for u in site.data.stage("cluster")["units"])["manifest"]
    pages = ["/", "/clusters", "/clusters?sort=retrieved&order=asc", "/clusters/0", "/map", "/queries",
             "/queries?source=cur", f"/queries/{ids['query']}", "/removed", "/removed?stage=hash_dedup",
             "/removed?stage=hash_dedup&reason=near_duplicate", "/removed?stage=ingest", "/removed?stage=nsfw",
             "/faces", f"/images/{ids['retrieved']}", f"/images/{ids['nsfw']}", "/provenance"]
    pages += [f"/stages/{s}" for s in site.data.engine.stage_names()]
    for page in pages:
        status, headers, body = site.request(page)
        assert status == 200, page
        assert headers["content-type"].startswith("text/html"), page
        assert "default-src 'none'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
        assert b"Traceback" not in body
    status, headers, body = site.request(f"/files/{manifest}")
    assert status == 200 and headers["content-type"] == "application/json"
    assert body == (site.data.root / manifest).read_bytes()
    assert site.request("/static/style.css")[0] == 200 and site.request("/healthz")[2] == b"ok\n"
    status, headers, _ = site.request(f"/provenance?q={ids['member']}")
    assert status == 303 and headers["location"] == f"/images/{ids['member']}"


def test_read_only_get_and_head_only(site) -> None:
    status, headers, body = site.request("/", method="HEAD")
    assert status == 200 and body == b"" and headers["content-type"].startswith("text/html")
    for path in ("/", "/clusters/0", "/files/x.json", "/thumbs/x.jpg", "/no/such/page"):
        for method in WRITE_METHODS:
            status, headers, _ = site.request(path, method=method)
            assert status == 405 and headers["allow"] == "GET, HEAD", (method, path)


def test_bad_ids_give_404_pages(site) -> None:
    ids = _ids(site)
    bad = ["/images/" + "0" * 64, "/images/xyz", "/images/..%2F..%2Fetc%2Fpasswd", "/clusters/999999",
           "/clusters/-1", "/clusters/abc", "/clusters/1e3", "/clusters?page=0", "/clusters?page=abc",
           "/clusters?page=99999999999", f"/queries/{ids['retrieved']}", "/queries/zzz", "/queries?source=web",
           "/removed?stage=nope", "/stages/nope", "/thumbs/" + "0" * 64 + ".jpg", "/thumbs/abc.jpg",
           f"/thumbs/{ids['member']}.png", "/provenance?q=http://nowhere.example/x.jpg", "/static/../app.py",
           "/static/app.py", "/nothing/here", "/faces?page=7"]
    for path in bad:
        status, headers, body = site.request(path)
        assert status == 404, path
        assert headers["content-type"].startswith("text/html") and b"Not found" in body, path
        assert b"Traceback" not in body and b"File \"" not in body, path


def test_files_only_from_inside_the_run_root(site, tmp_path) -> None:
    root = site.data.root
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    probes = root / "dashboard" / "probes"
    probes.mkdir(parents=True, exist_ok=True)
    (probes / "out.json").unlink(missing_ok=True)
    (probes / "out.json").symlink_to(secret)
    if not (probes / "outdir").is_symlink():
        (probes / "outdir").symlink_to(tmp_path.parent)
    rel_secret = f"{tmp_path.name}/secret.json"
    shard = next(root.glob("stages/ingest/*/part-00000.parquet")).relative_to(root)
    for path in ["/files/../../../../etc/passwd", "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/files/..%2f..%2f..%2fetc%2fpasswd", "/files//etc/passwd", "/files/%2fetc%2fpasswd",
                 f"/files/{secret}", "/files/dashboard/probes/out.json", f"/files/dashboard/probes/outdir/{rel_secret}",
                 "/files/stages", "/files/%00.json", f"/files/{shard}", "/thumbs/..%2f..%2fdemo.yaml.jpg",
                 "/files/..\\..\\demo.yaml"]:
        status, _, body = site.request(path)
        assert status == 404, path
        assert b"\"secret\": true" not in body and b"root:x:" not in body, path


def test_thumbnails(site) -> None:
    ids = _ids(site)
    status, headers, body = site.request(f"/thumbs/{ids['member']}.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and body[:2] == b"\xff\xd8"
    status, headers, body = site.request(f"/thumbs/{ids['nsfw']}.jpg")
    assert status == 200 and headers["content-type"] == "image/png" and body == placeholder_png()
    page = site.request("/removed?stage=nsfw")[2].decode()
    assert page.count('<img src="/thumbs/') == page.count('class="placeholder"') > 0  # NSFW: grey only


def test_host_header_is_checked(site) -> None:
    assert site.request("/", headers={"Host": "evil.example"})[0] == 400  # DNS rebinding
    assert site.request("/", headers={"Host": f"localhost:{site.port}"})[0] == 200


def test_binds_loopback_by_default() -> None:
    args = build_parser().parse_args(["dashboard"])
    assert args.host == "127.0.0.1" and args.port == 8777


def test_server_errors_show_no_traceback(demo_run, monkeypatch) -> None:
    cfg, _ = demo_run
    app = create_app(load_config(cfg), allowed_hosts=["testserver"])

    def broken():
        raise RuntimeError("secret internals")

    monkeypatch.setattr(app.state.data, "overview", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/")
    assert r.status_code == 500 and "Server error" in r.text
    assert "secret internals" not in r.text and "Traceback" not in r.text


def test_a_run_with_nothing_done_yet(tmp_path) -> None:
    folder = tmp_path / "cur"
    folder.mkdir()
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(f"name: empty\nroot: out\nsources:\n  curated: [{{name: cur, images: {folder}}}]\n")
    app = create_app(load_config(cfg), allowed_hosts=["testserver"])
    with TestClient(app) as client:
        for page in ("/", "/removed", "/faces", "/queries", "/stages/ingest"):
            assert client.get(page).status_code == 200, page
        for page in ("/clusters", "/map", "/clusters/0"):
            assert client.get(page).status_code == 404, page
    assert not Path(tmp_path / "out" / "stages").exists()  # the dashboard computed nothing
