"""Follow one Prefect flow run of a curation flow: one line per stage as it finishes.

    python -m pipeline.runwatch FLOW_RUN_ID [--config CFG] [--log FILE] [--poll SECONDS]

Polls the Prefect API (``PREFECT_API_URL``) until the flow run reaches a final state. Each task
run (one per stage) that finishes prints one line: the stage, whether it was computed or served
from the cache, its wall seconds in the flow run, and its rows and counts as ``lvd status`` reads
them from the stage outputs on disk (``Engine.status``), e.g.::

      ingest       computed     8.1s     240 rows  status: ok=236, http_404=4
      hash_dedup   cached       0.4s     236 rows  kept=231, removed=5

Exit status 0 iff the flow run ended ``Completed`` (1 for any other final state, 130 when
interrupted). ``--log FILE`` writes the stage lines and the flow run's full logs (flow and task
runs, as the Prefect UI shows them) to FILE when the run ends.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence
from uuid import UUID

from pipeline.cli import format_counts  # the count formatting of `lvd status`
from pipeline.engine import Engine, StageStatus, store

FINAL = ("COMPLETED", "FAILED", "CANCELLED", "CRASHED")
MAX_COUNT_VALUES = 4  # a line shows the largest few values of a stage's count column
CLOCK_SLACK = timedelta(seconds=2)  # manifests' times have 1 s resolution; hosts' clocks may differ a little
LATE_NOTICE_S = 30.0  # a flow run still scheduled after this long: say who should pick it up


def _state_type(run: Any) -> str | None:
    """A run's state type as an upper-case string (``COMPLETED``...), or None before it has one."""
    st = getattr(run, "state_type", None) or getattr(getattr(run, "state", None), "type", None)
    if st is None:
        return None
    return str(getattr(st, "value", st)).upper()


def _state_name(run: Any) -> str:
    return getattr(run, "state_name", None) or getattr(getattr(run, "state", None), "name", None) or "?"


def is_final(run: Any) -> bool:
    return _state_type(run) in FINAL


def run_seconds(run: Any) -> float | None:
    """Wall seconds of a task or flow run (end - start; else Prefect's total_run_time)."""
    start, end = getattr(run, "start_time", None), getattr(run, "end_time", None)
    if start is not None and end is not None:
        return max(0.0, (end - start).total_seconds())
    total = getattr(run, "total_run_time", None)
    return total.total_seconds() if total else None


def stage_of(task_run_name: str, stages: Iterable[str]) -> str | None:
    """The stage a task run belongs to: its task is named after the stage (run names are ``<stage>-<key>``)."""
    for stage in sorted(stages, key=len, reverse=True):
        if task_run_name == stage or task_run_name.startswith(stage + "-"):
            return stage
    return None


def summarize_counts(counts: dict[str, dict] | None) -> str:
    """``kept=N, removed=M`` for a filtering stage; else the first count column, largest values first."""
    if not counts:
        return ""
    col = "decision" if "decision" in counts else next(iter(counts))
    values = sorted(counts[col].items(), key=lambda kv: -kv[1])
    text = format_counts(dict(values[:MAX_COUNT_VALUES]))
    if len(values) > MAX_COUNT_VALUES:
        text += f", +{len(values) - MAX_COUNT_VALUES} more"
    return text if col == "decision" else f"{col}: {text}"


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def computed_since(manifests: Iterable[dict | None], since: datetime | None) -> bool | None:
    """True when any unit of a stage was (re)computed after ``since`` (its manifest's ``started_at``),
    False when all were there before (served from the cache); None when it cannot tell."""
    if since is None:
        return None
    if since.tzinfo is None:
        since = since.replace(tzinfo=timezone.utc)
    started = [_parse_time(m.get("started_at")) for m in manifests if m]
    if not started or any(t is None for t in started):
        return None
    return any(t >= since - CLOCK_SLACK for t in started)


def format_stage_line(stage: str, width: int, outcome: str, seconds: float | None = None,
                      status: StageStatus | None = None, detail: str = "") -> str:
    """One stage line: name, outcome (computed | cached | FAILED ...), seconds, rows and counts."""
    secs = "-" if seconds is None else f"{seconds:.1f}s"
    line = f"  {stage:<{width}}  {outcome:<9} {secs:>8}"
    if status is not None:
        rows = "?" if status.rows is None else str(status.rows)
        line += f"  {rows:>7} rows"
        counts = summarize_counts(status.counts)
        if counts:
            line += f"  {counts}"
    if detail:
        line += f"  {detail}"
    return line.rstrip()


def _one_line(text: str | None, limit: int = 240) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass
class StageInfo:
    """What the disk says about a stage once its task finished: ``lvd status``'s row, computed or cached."""

    status: StageStatus | None
    computed: bool | None


class StageTracker:
    """Turns successive snapshots of a flow run's task runs into one line per finished stage.

    ``lookup(stage, task_run)`` reads the stage's outputs (rows, counts, computed or cached); it is
    called once per finished task run. Pure bookkeeping otherwise: no I/O, no Prefect client.
    """

    def __init__(self, stages: Sequence[str], lookup: Callable[[str, Any], StageInfo]):
        self.stages = list(stages)
        self.width = max([len(s) for s in self.stages] + [5])
        self.lookup = lookup
        self.reported: set[Any] = set()  # task run ids already printed
        self.done_stages: set[str] = set()
        self.lines: list[str] = []

    def update(self, task_runs: Iterable[Any]) -> list[str]:
        """Lines for the task runs that became final since the last call, in the order they ended."""
        new = [tr for tr in task_runs if is_final(tr) and tr.id not in self.reported]
        new.sort(key=lambda tr: (getattr(tr, "end_time", None) is None, getattr(tr, "end_time", None) or 0))
        out = []
        for tr in new:
            self.reported.add(tr.id)
            stage = stage_of(tr.name, self.stages) or tr.name
            self.done_stages.add(stage)
            out.append(self._line(stage, tr))
        self.lines += out
        return out

    def _line(self, stage: str, tr: Any) -> str:
        seconds = run_seconds(tr)
        if _state_type(tr) != "COMPLETED":
            message = _one_line(getattr(getattr(tr, "state", None), "message", None))
            return format_stage_line(stage, self.width, _state_name(tr).upper(), seconds, detail=message)
        try:
            info = self.lookup(stage, tr)
        except Exception as err:  # noqa: BLE001 - the line must still be printed
            return format_stage_line(stage, self.width, "done", seconds, detail=f"(outputs unreadable: {err})")
        outcome = {True: "computed", False: "cached", None: "done"}[info.computed]
        if info.status is not None and info.status.state != "done":
            outcome = info.status.state  # the task ended but the engine sees the stage unfinished
        return format_stage_line(stage, self.width, outcome, seconds, info.status)

    def pending_task_runs(self, task_runs: Iterable[Any]) -> list[Any]:
        return [tr for tr in task_runs if not is_final(tr)]

    def finish(self, task_runs: Iterable[Any]) -> list[str]:
        """One line naming the stages that did not finish (with their task run's state, e.g. NotReady
        when an upstream stage failed); nothing when every stage did."""
        skipped = []
        for tr in task_runs:
            if not is_final(tr) and tr.id not in self.reported:
                self.reported.add(tr.id)
                stage = stage_of(tr.name, self.stages) or tr.name
                self.done_stages.add(stage)
                skipped.append(f"{stage} ({_state_name(tr)})")
        for stage in self.stages:
            if stage not in self.done_stages:
                self.done_stages.add(stage)
                skipped.append(stage)
        out = [f"  not run: {', '.join(skipped)}"] if skipped else []
        self.lines += out
        return out


def final_line(name: str, state_name: str, seconds: float | None, message: str | None = None) -> str:
    """The last line: the flow run's final state (and why, when it did not complete)."""
    took = "" if seconds is None else f" after {seconds:.1f}s"
    line = f"flow run {name!r}: {state_name}{took}"
    if state_name != "Completed" and message:
        line += f" — {_one_line(message)}"
    return line


def exit_code(state_type: str | None) -> int:
    return 0 if state_type == "COMPLETED" else 1


def engine_lookup(engine: Engine) -> Callable[[str, Any], StageInfo]:
    """StageTracker's lookup on a real engine: ``Engine.status`` (as ``lvd status``) + unit manifests."""

    def lookup(stage: str, task_run: Any) -> StageInfo:
        status = engine.status(stage)
        manifests = [store.read_manifest(u.dir) for u in engine.units(stage)]
        return StageInfo(status, computed_since(manifests, getattr(task_run, "start_time", None)))

    return lookup


def format_logs(logs: Iterable[Any], task_run_names: dict[Any, str]) -> list[str]:
    """Prefect log records as ``HH:MM:SS.mmm | LEVEL | who - message`` lines."""
    out = []
    for rec in logs:
        ts = rec.timestamp.astimezone() if getattr(rec, "timestamp", None) else None
        when = ts.strftime("%H:%M:%S.%f")[:-3] if ts else "--:--:--"
        who = task_run_names.get(getattr(rec, "task_run_id", None)) or "flow run"
        out.append(f"{when} | {logging.getLevelName(rec.level):<8} | {who} - {rec.message}")
    return out


# ------------------------------------------------------------------------------------ Prefect side
async def _paged(read: Callable[..., Any], page_size: int = 200, **kwargs: Any) -> list[Any]:
    """Every record of a paged Prefect client read (``limit`` / ``offset``)."""
    out: list[Any] = []
    while True:
        page = await read(limit=page_size, offset=len(out), **kwargs)
        out += page
        if len(page) < page_size:
            return out


async def _task_runs(client: Any, flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

    flt = TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[flow_run_id]))
    return await _paged(client.read_task_runs, task_run_filter=flt)


async def _logs(client: Any, flow_run_id: UUID) -> list[Any]:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    flt = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
    return await _paged(client.read_logs, log_filter=flt, sort=LogSort.TIMESTAMP_ASC)


async def _settle_logs(client: Any, flow_run_id: UUID, max_wait: float = 8.0) -> list[Any]:
    """The flow run's logs once no more arrive (its process sends them in batches, after the state)."""
    logs = await _logs(client, flow_run_id)
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        again = await _logs(client, flow_run_id)
        if len(again) == len(logs):
            return again
        logs = again
    return logs


def _expected_stages(engine: Engine, flow_name: str, parameters: dict) -> list[str]:
    """The stages the flow run will run: the whole plan (up to ``until``) or one stage's rerun flow."""
    names = engine.stage_names()
    if flow_name in names:
        return [flow_name]
    try:
        return engine.stages_until(parameters.get("until"))
    except Exception:  # noqa: BLE001 - an unknown `until`: the flow run fails on it, and says so
        return names


async def follow(flow_run_id: UUID, config: str | None = None, poll: float = 1.0, log_file: Path | None = None,
                 out: Callable[[str], None] = print) -> str | None:
    """Follow the flow run until it is final; print stage lines; return its final state type."""
    from prefect.client.orchestration import get_client

    from pipeline.config import load_config

    async with get_client() as client:
        fr = await client.read_flow_run(flow_run_id)
        flow = await client.read_flow(fr.flow_id)
        config = config or fr.parameters.get("config")
        if not config:
            raise ValueError(f"flow run {flow_run_id} has no `config` parameter: pass --config")
        engine = Engine(load_config(config), show_progress=False)
        tracker = StageTracker(_expected_stages(engine, flow.name, fr.parameters), engine_lookup(engine))
        n = len(tracker.stages)
        out(f"flow run {fr.name!r} of {flow.name}: {n} stage{'' if n == 1 else 's'}, a line each as it ends")
        began, noticed = time.monotonic(), False
        task_runs: list[Any] = []
        while True:
            fr = await client.read_flow_run(flow_run_id)
            task_runs = await _task_runs(client, flow_run_id)
            for line in tracker.update(task_runs):
                out(line)
            st = _state_type(fr)
            if st in FINAL:
                break
            if st in ("SCHEDULED", "PENDING") and not noticed and time.monotonic() - began > LATE_NOTICE_S:
                noticed = True
                out(f"  (still {_state_name(fr)} after {LATE_NOTICE_S:.0f}s: is the process serving its deployment "
                    f"up? see runs/logs/)")
            await asyncio.sleep(poll)
        # Task run states reach the API through events: give the last ones a moment to land.
        deadline = time.monotonic() + 10.0
        while tracker.pending_task_runs(task_runs) and time.monotonic() < deadline:
            await asyncio.sleep(min(poll, 1.0))
            task_runs = await _task_runs(client, flow_run_id)
            for line in tracker.update(task_runs):
                out(line)
        for line in tracker.finish(task_runs):
            out(line)
        last = final_line(fr.name, _state_name(fr), run_seconds(fr), getattr(fr.state, "message", None))
        if log_file is not None:
            logs = await _settle_logs(client, flow_run_id)
            names = {tr.id: tr.name for tr in task_runs}
            log_file.parent.mkdir(parents=True, exist_ok=True)
            log_file.write_text("\n".join([f"flow run {fr.name!r} ({fr.id}) of {flow.name}, config {config}",
                                           *tracker.lines, last, "", "logs:", *format_logs(logs, names)]) + "\n")
            last += f" (logs: {log_file})"
        out(last)
        return _state_type(fr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.runwatch", description=__doc__.split("\n\n")[0])
    parser.add_argument("flow_run_id", type=UUID, help="the flow run's id (`prefect deployment run` prints it)")
    parser.add_argument("--config", help="the run config (default: the flow run's `config` parameter)")
    parser.add_argument("--log", type=Path, help="write the stage lines and the flow run's logs here at the end")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between API polls (default 1)")
    args = parser.parse_args(argv)
    try:
        state = asyncio.run(follow(args.flow_run_id, args.config, args.poll, args.log,
                                   out=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print("runwatch: interrupted (the flow run itself goes on unless cancelled)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - no API, unknown run, bad config: one line, not a traceback
        print(f"runwatch: error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    return exit_code(state)


if __name__ == "__main__":
    sys.exit(main())
