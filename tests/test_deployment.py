"""A real Prefect server, `lvd serve`, and `prefect deployment run --watch`: the path infra/serve.sh takes."""
from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from pipeline.config import load_config
from pipeline.engine import Engine
from prefect_server import BIN, PrefectServer, http_ok, stop_process, tiny_config, wait_until

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def test_served_deployment_runs_and_fills_the_cache(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, "deploytest")
    with PrefectServer(tmp_path / "prefect-home") as server:
        env = server.env()
        log_path = tmp_path / "serve.log"
        with open(log_path, "wb") as log:
            serving = subprocess.Popen([str(BIN / "lvd"), "serve", "--config", str(config)], cwd=REPO, env=env,
                                       stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            for deployment in ("curate-and-train/deploytest", "ingest/deploytest"):
                wait_until(lambda: http_ok(f"{server.api_url}/deployments/name/{deployment}"), 60,
                           f"deployment {deployment}", alive=lambda: serving.poll() is None)
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "curate-and-train/deploytest", "--param", "until=ingest",
                 "--watch", "--watch-timeout", "60"],
                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
            assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n--- serve log:\n{log_path.read_text()[-4000:]}"

            flow_runs = httpx.post(f"{server.api_url}/flow_runs/filter",
                                   json={"sort": "EXPECTED_START_TIME_DESC", "limit": 5}, timeout=10).json()
            assert [r["state"]["type"] for r in flow_runs] == ["COMPLETED"]
            assert flow_runs[0]["parameters"]["config"] == str(config.resolve())
            artifacts = httpx.post(f"{server.api_url}/artifacts/filter",
                                   json={"artifacts": {"key": {"any_": ["lvd-deploytest-ingest"]}}}, timeout=10).json()
            assert len(artifacts) == 1 and artifacts[0]["type"] == "table"
            logs = httpx.post(f"{server.api_url}/logs/filter",
                              json={"logs": {"flow_run_id": {"any_": [flow_runs[0]["id"]]}}, "limit": 200}, timeout=10).json()
            assert any(entry["name"] == "lvd" and "ingest[tiny]" in entry["message"] for entry in logs), \
                "the engine's `lvd` log records did not reach the flow run's logs"
        finally:
            stop_process(serving)

    status = Engine(load_config(config), show_progress=False).status("ingest")
    assert status.state == "done" and status.rows == 3
    assert Path(status.path).is_dir()
