"""Where the dashboard is and which page shows each stage (no heavy imports: the flows use it)."""
from __future__ import annotations

import os
from urllib.parse import quote

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8777
URL_ENV = "LVD_DASHBOARD_URL"


def base_url() -> str:
    """The dashboard's base URL: ``$LVD_DASHBOARD_URL``, else http://127.0.0.1:<default port>."""
    return (os.environ.get(URL_ENV) or f"http://{DEFAULT_HOST}:{DEFAULT_PORT}").rstrip("/")


def stage_path(stage: str) -> str:
    """The dashboard page of one stage (its counts, fingerprint, and links to what it produced)."""
    return f"/stages/{quote(stage, safe='')}"


def stage_url(stage: str, base: str | None = None) -> str:
    return (base or base_url()).rstrip("/") + stage_path(stage)
