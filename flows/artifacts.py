"""Prefect artifacts of stage results: pure builders (unit-tested) plus one publishing call."""
from __future__ import annotations

import re
from typing import Any

KEY_PREFIX = "lvd"
SUMMARY_FIELDS = ("stage", "state", "rows", "seconds", "fingerprint")


def artifact_key(config_name: str, stage: str) -> str:
    """`lvd-<config>-<stage>`, lowercased, every run of characters outside [a-z0-9-] made one dash."""
    raw = f"{KEY_PREFIX}-{config_name}-{stage}".lower()
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", raw)).strip("-")


def status_rows(status: dict[str, Any]) -> list[dict[str, Any]]:
    """Table rows (metric, value) of a `StageStatus.as_dict()`: the summary fields, then one per count."""
    rows = [{"metric": f, "value": status.get(f)} for f in SUMMARY_FIELDS]
    for column, counts in sorted((status.get("counts") or {}).items()):
        for value, n in sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0]))):
            rows.append({"metric": f"{column}={value}", "value": n})
    return rows


def status_description(config_name: str, status: dict[str, Any]) -> str:
    """One markdown line describing the stage result, for the artifact's description."""
    rows = "-" if status.get("rows") is None else status["rows"]
    work = "computed in this run" if status.get("computed") else "reused from the cache"
    return (f"Stage `{status.get('stage')}` of run `{config_name}`: **{status.get('state')}**, {rows} rows, "
            f"{work}. Output: `{status.get('path')}`")


def publish_status(config_name: str, status: dict[str, Any]) -> str:
    """Create the stage's table artifact in the current Prefect run; returns its key."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(config_name, str(status.get("stage")))
    create_table_artifact(table=status_rows(status), key=key, description=status_description(config_name, status))
    return key
