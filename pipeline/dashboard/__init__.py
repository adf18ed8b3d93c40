"""`lvd dashboard`: a read-only web explorer of one run's outputs (funnel, clusters, map, queries,
removals, provenance), FastAPI + Jinja2 server-rendered pages, thumbnails cached under the run root."""
from __future__ import annotations

import logging

from pipeline.config import Config
from pipeline.dashboard.links import DEFAULT_HOST, DEFAULT_PORT, URL_ENV, base_url, stage_path, stage_url

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "URL_ENV", "base_url", "create_app", "serve", "stage_path", "stage_url"]

log = logging.getLogger("lvd")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(config: Config, allowed_hosts: list[str] | None = None):
    from pipeline.dashboard.app import create_app as _create

    return _create(config, allowed_hosts)


def serve(config: Config, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Index the run (once per set of outputs), then serve the dashboard until interrupted."""
    import uvicorn

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    app = create_app(config, allowed_hosts=None if host in LOOPBACK else ["*"])
    if host not in LOOPBACK:
        log.warning("dashboard: listening on %s — anyone who can reach this address can browse the run", host)
    app.state.data.index()  # build the index before the first request
    shown = f"[{host}]" if ":" in host else host
    print(f"lvd dashboard of {config.name} ({config.root}): http://{shown}:{port}/", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
