"""Where the dashboard is, for the Prefect artifacts' links."""
from __future__ import annotations

from pipeline.dashboard.links import DEFAULT_PORT, base_url, stage_path, stage_url


def test_default_and_env_base_url(monkeypatch) -> None:
    monkeypatch.delenv("LVD_DASHBOARD_URL", raising=False)
    assert base_url() == f"http://127.0.0.1:{DEFAULT_PORT}"
    monkeypatch.setenv("LVD_DASHBOARD_URL", "http://127.0.0.1:9999/")
    assert stage_url("hash_dedup") == "http://127.0.0.1:9999/stages/hash_dedup"
    assert stage_url("a b", "http://h:1") == "http://h:1/stages/a%20b"
    assert stage_path("x/../y") == "/stages/x%2F..%2Fy"
