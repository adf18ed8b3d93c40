"""The Prefect flows over the engine: artifact rows, and real in-process flow runs (ephemeral API)."""
from __future__ import annotations

import json

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.sorting import ArtifactSort
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_SERVER_ANALYTICS_ENABLED, temporary_settings
from prefect.testing.utilities import prefect_test_harness

import flows.curate as curate
from flows.artifacts import artifact_key, status_description, status_rows
from pipeline.engine import StageError, StageStatus, stage_names
from prefect_server import tiny_config


def test_artifact_key_is_lowercase_dashes() -> None:
    assert artifact_key("Demo_Run.v2", "hash_dedup") == "lvd-demo-run-v2-hash-dedup"
    assert artifact_key("demo", "ingest") == "lvd-demo-ingest"


def test_status_rows_summary_then_counts() -> None:
    status = StageStatus("ingest", "done", "abc123", 59, "/x", 1.5,
                         counts={"status": {"http_404": 2, "ok": 57}}, computed=True).as_dict()
    assert status_rows(status) == [
        {"metric": "stage", "value": "ingest"},
        {"metric": "state", "value": "done"},
        {"metric": "rows", "value": 59},
        {"metric": "seconds", "value": 1.5},
        {"metric": "fingerprint", "value": "abc123"},
        {"metric": "status=ok", "value": 57},
        {"metric": "status=http_404", "value": 2},
    ]


def test_status_description_links_to_the_stage_dashboard_page(monkeypatch) -> None:
    status = StageStatus("cluster", "done", "f", 3, "/x", 1.0).as_dict()
    monkeypatch.delenv("LVD_DASHBOARD_URL", raising=False)
    assert "](http://127.0.0.1:8777/stages/cluster)" in status_description("demo", status)
    monkeypatch.setenv("LVD_DASHBOARD_URL", "http://127.0.0.1:9000/")
    assert "](http://127.0.0.1:9000/stages/cluster)" in status_description("demo", status)


def test_status_rows_of_missing_stage() -> None:
    rows = status_rows(StageStatus("embed", "missing", "f", None, "/y", None).as_dict())
    assert [r["metric"] for r in rows] == ["stage", "state", "rows", "seconds", "fingerprint"]
    assert rows[2]["value"] is None


def test_one_task_and_one_flow_per_registered_stage() -> None:
    for name in stage_names():
        assert curate.stage_task(name).name == name
        assert curate.stage_flow(name).name == name
        assert getattr(curate, f"{name}_flow") is curate.stage_flow(name)
        assert curate.stage_task(name).cache_policy is curate.NO_CACHE
    assert curate.curate_and_train.name == "curate-and-train"


@pytest.fixture(scope="module")
def prefect_api():
    """An ephemeral Prefect API on a temporary SQLite database."""
    with temporary_settings({PREFECT_SERVER_ANALYTICS_ENABLED: False}), prefect_test_harness(server_startup_timeout=60):
        yield


def latest_artifact_rows(key: str) -> tuple[list[dict], object]:
    """Rows and task-run id of the newest artifact with ``key``."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])),
                                      sort=ArtifactSort.CREATED_DESC, limit=1)
    assert found, f"no artifact with key {key}"
    data = found[0].data
    return (json.loads(data) if isinstance(data, str) else data), found[0].task_run_id


def test_curate_and_train_runs_ingest_then_reuses_it(prefect_api, tmp_path) -> None:
    config = tiny_config(tmp_path, "flowtest")
    state = curate.curate_and_train(str(config), until="ingest", return_state=True)
    first = state.result()
    assert [s["stage"] for s in first] == ["ingest"]
    assert first[0]["state"] == "done" and first[0]["rows"] == 3 and first[0]["computed"] is True
    assert first[0]["counts"]["status"] == {"ok": 3}

    second = curate.curate_and_train(str(config), until="ingest")
    assert second[0]["computed"] is False and second[0]["fingerprint"] == first[0]["fingerprint"]

    rows, task_run_id = latest_artifact_rows("lvd-flowtest-ingest")
    table = {r["metric"]: r["value"] for r in rows}
    assert table["stage"] == "ingest" and table["state"] == "done" and table["rows"] == 3
    assert table["status=ok"] == 3 and table["fingerprint"] == first[0]["fingerprint"]
    assert task_run_id is not None
    with get_client(sync_client=True) as client:
        artifact = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["lvd-flowtest-ingest"])),
                                         sort=ArtifactSort.CREATED_DESC, limit=1)[0]
    assert "/stages/ingest)" in artifact.description  # links to the stage's dashboard page
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    assert any("ingest[tiny]: computing" in entry.message and entry.task_run_id for entry in logs), \
        "the engine's `lvd` log records are missing from the task run's logs"


def test_stage_flow_reruns_one_stage(prefect_api, tmp_path) -> None:
    config = tiny_config(tmp_path, "stageflow")
    made = curate.stage_flow("ingest")(str(config))
    assert made["state"] == "done" and made["rows"] == 3 and made["computed"] is True
    assert curate.stage_flow("ingest")(str(config))["computed"] is False
    forced = curate.stage_flow("ingest")(str(config), force=True)
    assert forced["computed"] is True and forced["fingerprint"] == made["fingerprint"]


def test_curate_and_train_rejects_unknown_stages(prefect_api, tmp_path) -> None:
    config = tiny_config(tmp_path, "badnames")
    with pytest.raises(StageError):
        curate.curate_and_train(str(config), force=["no_such_stage"])
    with pytest.raises(StageError):
        curate.curate_and_train(str(config), until="no_such_stage")


def test_summary_markdown_lists_every_field() -> None:
    from flows.artifacts import summary_markdown

    md = summary_markdown("train", {"last_loss": 8.29859, "steps": 20, "arch": "vit_test", "hist": {"a": 1}})
    assert md.splitlines()[:4] == ["## `train` summary", "", "| field | value |", "|---|---|"]
    assert "| last_loss | 8.299 |" in md and "| steps | 20 |" in md and "| hist | `{'a': 1}` |" in md
