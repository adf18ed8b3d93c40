"""pipeline/runwatch.py without servers: stage names, count summaries, computed vs cached, the stage
lines of finished / failed / never-run task runs, the final line and the exit status."""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from uuid import uuid4

import pytest

from pipeline.engine import StageStatus
from pipeline.runwatch import (StageInfo, StageTracker, computed_since, exit_code, final_line, format_logs,
                               format_stage_line, is_final, run_seconds, stage_of, summarize_counts)

T0 = datetime(2025, 1, 2, 3, 4, 5, 600000, tzinfo=timezone.utc)
STAGES = ["ingest", "hash_dedup", "nsfw", "embed", "copy_dedup", "cluster", "dataset", "train"]


def task_run(name: str, state_type: str | None, state_name: str | None = None, start: float | None = 0.0,
             end: float | None = 1.5, message: str | None = None) -> SimpleNamespace:
    """A stand-in for prefect's TaskRun: the fields runwatch reads."""
    return SimpleNamespace(
        id=uuid4(), name=name, state_type=state_type, state_name=state_name or (state_type or "").title(),
        start_time=None if start is None else T0 + timedelta(seconds=start),
        end_time=None if end is None else T0 + timedelta(seconds=end), total_run_time=None,
        state=SimpleNamespace(message=message))


def status(stage: str, rows: int | None = 10, counts: dict | None = None, state: str = "done") -> StageStatus:
    return StageStatus(stage, state, "f" * 16, rows, f"/runs/{stage}", 1.0, counts)


def test_stage_of_matches_the_task_name_prefix():
    assert stage_of("ingest-3f2", STAGES) == "ingest"
    assert stage_of("copy_dedup-0", STAGES) == "copy_dedup"
    assert stage_of("embed", STAGES) == "embed"
    assert stage_of("embedding-1", STAGES) is None  # a prefix of a stage name is not enough
    assert stage_of("dedup-1", ["dedup", "dedup_more"]) == "dedup"
    assert stage_of("dedup_more-1", ["dedup", "dedup_more"]) == "dedup_more"  # longest stage name wins


def test_summarize_counts():
    assert summarize_counts(None) == "" and summarize_counts({}) == ""
    decisions = {"decision": {"removed": 5, "kept": 231}, "reason": {"kept": 231, "exact_duplicate": 5}}
    assert summarize_counts(decisions) == "kept=231, removed=5"
    assert summarize_counts({"status": {"ok": 236, "http_404": 4}}) == "status: ok=236, http_404=4"
    many = {"source": {f"s{i}": 10 - i for i in range(7)}}
    assert summarize_counts(many) == "source: s0=10, s1=9, s2=8, s3=7, +3 more"


def test_computed_since_compares_manifest_start_with_the_task_start():
    old = {"started_at": "2025-01-01T00:00:00+00:00"}
    new = {"started_at": "2025-01-02T03:04:05+00:00"}  # 1 s resolution: before T0's .6 s, still this run
    assert computed_since([old], T0) is False
    assert computed_since([old, new], T0) is True
    assert computed_since([{"started_at": "2025-01-02T03:04:09+00:00"}], T0) is True
    assert computed_since([old], None) is None  # the task run never started
    assert computed_since([], T0) is None and computed_since([None], T0) is None  # no manifest
    assert computed_since([{"started_at": "garbage"}], T0) is None
    naive = {"started_at": "2025-01-02T03:04:06"}  # read as UTC
    assert computed_since([naive], T0.replace(tzinfo=None)) is True


def test_run_seconds_and_final_states():
    assert run_seconds(task_run("ingest", "COMPLETED", start=0, end=2.25)) == 2.25
    assert run_seconds(task_run("ingest", "PENDING", start=None, end=None)) is None
    assert run_seconds(SimpleNamespace(start_time=None, end_time=None, total_run_time=timedelta(seconds=3))) == 3.0
    for st in ("COMPLETED", "FAILED", "CANCELLED", "CRASHED"):
        assert is_final(task_run("x", st))
    for st in ("SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING", None):
        assert not is_final(task_run("x", st))
    # a real prefect StateType enum (state_type missing: read from state.type)
    from prefect.client.schemas.objects import StateType

    assert is_final(SimpleNamespace(state_type=StateType.COMPLETED))
    assert is_final(SimpleNamespace(state=SimpleNamespace(type=StateType.CRASHED)))
    assert not is_final(SimpleNamespace(state_type=StateType.RUNNING))


def test_format_stage_line_columns():
    line = format_stage_line("hash_dedup", 10, "cached", 0.42,
                             status("hash_dedup", 236, {"decision": {"kept": 231, "removed": 5}}))
    assert line == "  hash_dedup  cached        0.4s      236 rows  kept=231, removed=5"
    assert format_stage_line("train", 10, "computed", 61.0, status("train", 1, None)) \
        == "  train       computed     61.0s        1 rows"
    assert format_stage_line("nsfw", 10, "not run") == "  nsfw        not run          -"
    assert format_stage_line("nsfw", 4, "FAILED", 3.0, detail="boom").endswith("3.0s  boom")


def test_tracker_prints_each_stage_once_in_the_order_they_end():
    seen = []

    def lookup(stage, tr):
        seen.append(stage)
        return StageInfo(status(stage, 7), computed=stage == "ingest")

    tracker = StageTracker(STAGES[:3], lookup)
    ingest = task_run("ingest-a1", "COMPLETED", start=0, end=5)
    dedup = task_run("hash_dedup-b2", "RUNNING", end=None)
    assert [ln.split()[:2] for ln in tracker.update([ingest, dedup])] == [["ingest", "computed"]]
    assert tracker.update([ingest, dedup]) == []  # nothing new
    dedup_done = SimpleNamespace(**{**vars(dedup), "state_type": "COMPLETED", "state_name": "Completed",
                                    "end_time": T0 + timedelta(seconds=6)})
    nsfw_done = task_run("nsfw-c3", "COMPLETED", start=5.5, end=5.8)  # ended first
    lines = tracker.update([ingest, dedup_done, nsfw_done])
    assert [ln.split()[0] for ln in lines] == ["nsfw", "hash_dedup"]
    assert all("cached" in ln and "7 rows" in ln for ln in lines)
    assert seen == ["ingest", "nsfw", "hash_dedup"]  # the disk is read once per finished stage
    assert tracker.finish([ingest, dedup_done, nsfw_done]) == []
    assert len(tracker.lines) == 3


def test_tracker_failed_crashed_and_never_run_stages():
    tracker = StageTracker(STAGES[:4], lambda s, tr: pytest.fail("a failed task's outputs are not read"))
    runs = [task_run("ingest-1", "FAILED", "Failed", end=2, message="Task run encountered an exception StageError:\n  disk full"),
            task_run("hash_dedup-2", "PENDING", "NotReady", start=None, end=None),
            task_run("nsfw-3", "CRASHED", "Crashed", end=3, message=None)]
    lines = tracker.update(runs)
    assert lines[0].split()[:3] == ["ingest", "FAILED", "2.0s"]
    assert lines[0].endswith("Task run encountered an exception StageError: disk full")  # one line
    assert lines[1].split()[:2] == ["nsfw", "CRASHED"]
    rest = tracker.finish(runs)
    assert rest == ["  not run: hash_dedup (NotReady), embed"]
    assert tracker.finish(runs) == []


def test_tracker_completed_but_unreadable_or_unfinished_outputs():
    def broken(stage, tr):
        raise FileNotFoundError("no such config")

    line = StageTracker(["ingest"], broken).update([task_run("ingest-1", "COMPLETED")])[0]
    assert "done" in line and "outputs unreadable: no such config" in line
    partial = StageTracker(["embed"], lambda s, tr: StageInfo(status(s, None, state="partial"), True))
    assert partial.update([task_run("embed-1", "COMPLETED")])[0].split()[:4] == ["embed", "partial", "1.5s", "?"]
    unknown = StageTracker(["embed"], lambda s, tr: StageInfo(status(s, 3), None))
    assert unknown.update([task_run("embed-1", "COMPLETED")])[0].split()[1] == "done"


def test_final_line_and_exit_code():
    assert final_line("able-fox", "Completed", 12.34, "All states completed.") == "flow run 'able-fox': Completed after 12.3s"
    assert final_line("able-fox", "Failed", None, "Flow run encountered an exception:\n StageError: x") \
        == "flow run 'able-fox': Failed — Flow run encountered an exception: StageError: x"
    assert final_line("able-fox", "Cancelled", 1.0, None) == "flow run 'able-fox': Cancelled after 1.0s"
    assert exit_code("COMPLETED") == 0
    assert {exit_code(s) for s in ("FAILED", "CANCELLED", "CRASHED", None)} == {1}


def test_format_logs_names_the_task_run():
    tr = uuid4()
    logs = [SimpleNamespace(timestamp=T0, level=logging.INFO, task_run_id=None, message="Beginning flow run"),
            SimpleNamespace(timestamp=T0, level=logging.WARNING, task_run_id=tr, message="ingest: done")]
    out = format_logs(logs, {tr: "ingest-a1"})
    assert out[0].endswith("| INFO     | flow run - Beginning flow run")
    assert out[1].endswith("| WARNING  | ingest-a1 - ingest: done")
    assert out[0][:12].count(":") == 2 and out[0][8] == "."  # HH:MM:SS.mmm


@pytest.mark.parametrize("outcome, code", [("COMPLETED", 0), ("FAILED", 1), ("CRASHED", 1),
                                           (KeyboardInterrupt(), 130), (ConnectionError("refused"), 2)])
def test_main_exit_status(monkeypatch, capsys, outcome, code):
    """0 iff Completed; 130 when interrupted; 2 (one line, no traceback) when the API or config fails."""
    from pipeline import runwatch

    async def follow(flow_run_id, config, poll, log_file, out):
        assert (config, poll, str(log_file)) == ("configs/demo.yaml", 0.5, "x.txt")
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    monkeypatch.setattr(runwatch, "follow", follow)
    assert runwatch.main([str(uuid4()), "--config", "configs/demo.yaml", "--poll", "0.5", "--log", "x.txt"]) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code == 2:
        assert err.startswith("runwatch: error: ConnectionError: refused")
