"""Test helper: a real local Prefect server (SQLite in a temporary PREFECT_HOME) as a subprocess."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx

BIN = Path(sys.executable).parent
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "PREFECT_UI_ENABLED": "false",
             "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``check`` every 0.25 s until it is true; fail after ``timeout`` s or when ``alive`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if not alive():
            raise RuntimeError(f"gave up waiting for {what}: the process exited")
        time.sleep(0.25)
    raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f}s")


def http_ok(url: str) -> bool:
    """True when a GET of ``url`` answers 200."""
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the process group started with ``start_new_session``; SIGKILL it after ``grace`` s."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


class PrefectServer:
    """`prefect server start` on a free 127.0.0.1 port with its own PREFECT_HOME; use as a context manager."""

    def __init__(self, home: Path, port: int | None = None):
        self.home = Path(home)
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for processes that talk to this server."""
        return {**os.environ, **QUIET_ENV, "PREFECT_HOME": str(self.home), "PREFECT_API_URL": self.api_url}

    @property
    def log_path(self) -> Path:
        return self.home / "server.log"

    def start(self, timeout: float = 240.0) -> "PrefectServer":
        """Start the server and wait until /api/health answers."""
        self.home.mkdir(parents=True, exist_ok=True)
        env = self.env()
        env.pop("PREFECT_API_URL")
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            wait_until(lambda: http_ok(f"{self.api_url}/health"), timeout, "the Prefect server",
                       alive=lambda: self.proc.poll() is None)
        except Exception as err:
            self.stop()
            raise RuntimeError(f"{err}; server log:\n{self.log_tail()}") from None
        return self

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log (for failure messages)."""
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def stop(self) -> None:
        """Stop the server and every process it started."""
        if self.proc is not None:
            stop_process(self.proc)

    def __enter__(self) -> "PrefectServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def tiny_config(tmp_path: Path, name: str, images: int = 3) -> Path:
    """A run config with one curated folder source of ``images`` small PNG/JPEG files, root in ``tmp_path``."""
    from PIL import Image

    folder = tmp_path / "curated"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        img = Image.new("RGB", (40 + 8 * i, 30 + 4 * i), (60 * i % 256, 120, 200 - 30 * i))
        img.save(folder / (f"img{i}.png" if i % 2 else f"img{i}.jpg"))
    path = tmp_path / f"{name}.yaml"
    path.write_text(
        f"name: {name}\n"
        "root: out\n"
        "sources:\n"
        "  curated:\n"
        "    - name: tiny\n"
        "      images: curated\n"
        "ingest:\n"
        "  decode_workers: 1\n"
    )
    return path
