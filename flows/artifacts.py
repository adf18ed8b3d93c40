"""Prefect artifacts of stage results: pure builders (unit-tested) plus one publishing call."""
from __future__ import annotations

import re
from typing import Any

from pipeline.dashboard.links import stage_url

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


def dashboard_link(status: dict[str, Any], base: str | None = None) -> str:
    """A markdown link to the stage's page in `lvd dashboard` (base URL: $LVD_DASHBOARD_URL or the default)."""
    url = stage_url(str(status.get("stage")), base)
    return f"[Open `{status.get('stage')}` in the dashboard]({url})"


def status_description(config_name: str, status: dict[str, Any], base: str | None = None) -> str:
    """Markdown describing the stage result, with a link to its dashboard page, for the artifact's description."""
    rows = "-" if status.get("rows") is None else status["rows"]
    work = "computed in this run" if status.get("computed") else "reused from the cache"
    return (f"Stage `{status.get('stage')}` of run `{config_name}`: **{status.get('state')}**, {rows} rows, "
            f"{work}. Output: `{status.get('path')}`. {dashboard_link(status, base)} "
            f"(`lvd dashboard --config <this config>`)")


def publish_status(config_name: str, status: dict[str, Any]) -> str:
    """Create the stage's table artifact in the current Prefect run; returns its key."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(config_name, str(status.get("stage")))
    create_table_artifact(table=status_rows(status), key=key, description=status_description(config_name, status))
    return key


def summary_markdown(stage: str, summary: dict[str, Any]) -> str:
    """A stage's ``summary.json`` (e.g. a training run's losses, kNN, images/s) as a Markdown table."""
    lines = [f"## `{stage}` summary", "", "| field | value |", "|---|---|"]
    for key, value in sorted(summary.items()):
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (dict, list)):
            value = f"`{value}`"
        lines.append(f"| {key} | {value} |")
    return "\n".join(lines) + "\n"


def publish_summary(config_name: str, stage: str, summary: dict[str, Any]) -> str:
    """Create a Markdown artifact of a stage's summary (``lvd-<config>-<stage>-summary``); returns its key."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(config_name, f"{stage}-summary")
    create_markdown_artifact(markdown=summary_markdown(stage, summary), key=key,
                             description=f"Summary of stage `{stage}` of run `{config_name}`")
    return key
