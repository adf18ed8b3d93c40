"""The dashboard web app: FastAPI routes rendering Jinja2 templates over ``RunData``. Read-only.

Security: GET and HEAD only (anything else is 405); files are served only from inside the run
root (``safefiles.resolve_under``); ids are validated; errors render a plain page (404 for
anything unknown, 500 without a traceback); strict headers (CSP without inline scripts, no
framing, no sniffing); a Host allow-list when bound to loopback (DNS rebinding).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.config import Config
from pipeline.dashboard.data import NotFound, RunData
from pipeline.dashboard.links import stage_path
from pipeline.dashboard.safefiles import resolve_under, served_type

log = logging.getLogger("lvd")

HERE = Path(__file__).resolve().parent
READ_METHODS = ("GET", "HEAD")
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
STATIC = {"style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def _templates() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True)
    env.globals.update(stage_path=stage_path, urlencode=urlencode)
    env.filters["short"] = lambda s, n=12: (s or "")[:n]
    env.filters["num"] = lambda v: "-" if v is None else f"{v:,}" if isinstance(v, int) else v
    env.filters["sim"] = lambda v: "-" if v is None else f"{v:.3f}"
    return env


def _page(n: str | None) -> int:
    """A 1-based page number from a query parameter; NotFound for anything else."""
    if n is None or n == "":
        return 1
    if not n.isdigit() or len(n) > 9:
        raise NotFound(f"page {n!r}")
    return int(n)


def create_app(config: Config, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app over one run. ``allowed_hosts``: Host headers accepted (default: loopback names)."""
    data = RunData(config)
    env = _templates()

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        data.close()

    app = FastAPI(title="lvd dashboard", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.data = data
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or LOOPBACK_HOSTS)

    def render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        html = env.get_template(template).render(request=request, run=config.name, root=str(config.root),
                                                 path=request.url.path, **ctx)
        return HTMLResponse(html, status_code=status)

    def error_page(request: Request, status: int, title: str, detail: str) -> HTMLResponse:
        return render(request, "error.html", status=status, title=title, detail=detail)

    @app.middleware("http")
    async def read_only(request: Request, call_next):
        if request.method not in READ_METHODS:
            response: Response = HTMLResponse("<!doctype html><title>405</title><h1>405 Method Not Allowed</h1>"
                                              "<p>This dashboard is read-only.</p>", status_code=405,
                                              headers={"Allow": ", ".join(READ_METHODS)})
        else:
            response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        return response

    @app.exception_handler(NotFound)
    async def not_found(request: Request, exc: NotFound):
        return error_page(request, 404, "Not found", f"Nothing here: {exc}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return error_page(request, 404, "Not found", "No such page.")
        return error_page(request, exc.status_code, str(exc.status_code), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_params(request: Request, exc: RequestValidationError):
        return error_page(request, 404, "Not found", "No such page (bad parameters).")

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("dashboard: error on %s", request.url.path)
        return error_page(request, 500, "Server error", "Something went wrong; the server log has the details.")

    def route(path: str):
        return app.api_route(path, methods=list(READ_METHODS), include_in_schema=False)

    @route("/")
    def overview(request: Request):
        return render(request, "overview.html", **data.overview())

    @route("/stages/{name}")
    def stage(request: Request, name: str):
        return render(request, "stage.html", **data.stage(name))

    @route("/clusters")
    def clusters(request: Request, sort: str = "size", order: str = "desc", page: str | None = None):
        rows, extra = data.clusters(sort, order, _page(page))
        return render(request, "clusters.html", clusters=rows, **extra)

    @route("/clusters/{cid}")
    def cluster(request: Request, cid: str, page: str | None = None):
        if not cid.isdigit() or len(cid) > 9:
            raise NotFound(f"cluster {cid}")
        return render(request, "cluster.html", **data.cluster(int(cid), _page(page)))

    @route("/map")
    def cluster_map(request: Request):
        return render(request, "map.html", **data.map())

    @route("/queries")
    def queries(request: Request, source: str | None = None, page: str | None = None):
        rows, extra = data.queries(source or None, _page(page))
        return render(request, "queries.html", queries=rows, **extra)

    @route("/queries/{image_id}")
    def query(request: Request, image_id: str, page: str | None = None):
        return render(request, "query.html", **data.query(image_id, _page(page)))

    @route("/removed")
    def removed(request: Request, stage: str | None = None, reason: str | None = None, page: str | None = None):
        if not stage:
            return render(request, "removed_groups.html", groups=data.removed_groups())
        rows, extra = data.removed(stage, reason or None, _page(page))
        return render(request, "removed.html", removed=rows, **extra)

    @route("/faces")
    def faces(request: Request, page: str | None = None):
        return render(request, "faces.html", faces=data.faces(_page(page)))

    @route("/images/{image_id}")
    def image(request: Request, image_id: str):
        return render(request, "image.html", **data.trail(image_id))

    @route("/provenance")
    def provenance(request: Request, q: str | None = None):
        if not q:
            return render(request, "provenance.html", q="")
        try:
            image_id = data.resolve(q)
        except NotFound:
            return render(request, "provenance.html", status=404, q=q)
        return RedirectResponse(f"/images/{image_id}", status_code=303)

    @route("/thumbs/{name}")
    def thumb(name: str):
        if not name.endswith(".jpg"):
            raise NotFound(name)
        got = data.thumbnail(name[:-4])
        headers = {"Cache-Control": "private, max-age=3600"}
        if isinstance(got, bytes):
            return Response(got, media_type="image/png", headers=headers)
        path = resolve_under(data.root, str(got.relative_to(data.root)))
        if path is None:
            raise NotFound(name)
        return FileResponse(path, media_type="image/jpeg", headers=headers)

    @route("/files/{relative:path}")
    def run_file(relative: str):
        path = resolve_under(data.root, relative)
        kind = served_type(path) if path is not None else None
        if path is None or kind is None:
            raise NotFound(relative)
        return FileResponse(path, media_type=kind)

    @route("/static/{name}")
    def static(name: str):
        if name not in STATIC:
            raise NotFound(name)
        return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                            headers={"Cache-Control": "public, max-age=3600"})

    @route("/healthz")
    def healthz():
        return Response("ok\n", media_type="text/plain")

    return app
