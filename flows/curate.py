"""The `curate-and-train` flow, one flow per stage, and one task per registered stage.

Every task calls ``Engine(load_config(path)).ensure(stage)`` — the engine the CLI uses — so
flow runs and ``lvd`` commands share one cache. Tasks and flows are built from the stage
registry: a stage plugs in by registering, nothing here names a stage.
"""
from __future__ import annotations

import json

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from prefect import Flow, Task, flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.logging.handlers import APILogHandler
from prefect.task_runners import ThreadPoolTaskRunner

from flows.artifacts import publish_status, publish_summary
from pipeline.config import load_config
from pipeline.engine import Engine, StageError, stage_names

LVD_LOGGER = "lvd"
_TASKS: dict[str, Task] = {}
_FLOWS: dict[str, Flow] = {}


class _RunLogForwarder(logging.Handler):
    """Re-emits `lvd` records through a Prefect run logger, so they land in the run's logs."""

    def __init__(self, run_logger: logging.LoggerAdapter):
        super().__init__()
        self.run_logger = run_logger

    def emit(self, record: logging.LogRecord) -> None:
        """Forward one record (message already formatted; exception info kept)."""
        try:
            self.run_logger.log(record.levelno, record.getMessage(), exc_info=record.exc_info)
        except Exception:  # noqa: BLE001 - logging must never break a stage
            self.handleError(record)


@contextmanager
def lvd_logs_to_run() -> Iterator[None]:
    """Route the `lvd` logger (INFO and up) into the current Prefect run's logs for the block."""
    lvd = logging.getLogger(LVD_LOGGER)
    old_level, old_propagate = lvd.level, lvd.propagate
    lvd.setLevel(min(lvd.getEffectiveLevel(), logging.INFO))
    # PREFECT_LOGGING_EXTRA_LOGGERS=lvd already attaches Prefect's API handler: do not log twice.
    forwarder = None if any(isinstance(h, APILogHandler) for h in lvd.handlers) else _RunLogForwarder(get_run_logger())
    if forwarder:
        lvd.addHandler(forwarder)
        lvd.propagate = False  # the run logger prints to the console already
    try:
        yield
    finally:
        if forwarder:
            lvd.removeHandler(forwarder)
        lvd.setLevel(old_level)
        lvd.propagate = old_propagate


def ensure_stage(stage: str, config: str, force: bool = False) -> dict[str, Any]:
    """Run the engine for one stage (upstream first), publish its counts artifact, return its status."""
    with lvd_logs_to_run():
        engine = Engine(load_config(config), show_progress=False)
        status = engine.ensure(stage, force=force).as_dict()
    publish_status(engine.config.name, status)
    if "summary.json" in engine.stage(stage).artifacts and status["state"] == "done":  # dataset, train, distill
        publish_summary(engine.config.name, stage, json.loads(engine.read_artifact(stage, "summary.json")))
    get_run_logger().info("%s: %s, %s rows (%s)", stage, status["state"], status["rows"],
                          "computed" if status["computed"] else "cached")
    return status


def stage_task(stage: str) -> Task:
    """The Prefect task of a registered stage (built once; no Prefect caching, no retries)."""
    if stage not in _TASKS:
        def run(config: str, force: bool = False) -> dict[str, Any]:
            return ensure_stage(stage, config, force)

        run.__name__ = run.__qualname__ = f"{stage}_task"
        _TASKS[stage] = task(name=stage, cache_policy=NO_CACHE, retries=0,
                             description=f"Ensure stage `{stage}` through the engine")(run)
    return _TASKS[stage]


def plan(engine: Engine, until: str | None, force: list[str]) -> list[str]:
    """The stages to run in DAG order (all, or up to and including ``until``); checks ``force`` names."""
    unknown = sorted(set(force) - set(engine.stage_names()))
    if unknown:
        raise StageError(f"force names unknown stage(s) {unknown}; stages are: {', '.join(engine.stage_names())}")
    return engine.stages_until(until)


def _absolute(config: str) -> str:
    """The config path made absolute (tasks must not depend on the working directory)."""
    return str(Path(config).expanduser().resolve())


@flow(name="curate-and-train", task_runner=ThreadPoolTaskRunner(max_workers=1))
def curate_and_train(config: str, until: str | None = None, force: list[str] = []) -> list[dict[str, Any]]:  # noqa: B006
    """Curate and train: one task per stage in DAG order, each waiting for its upstream stages."""
    config = _absolute(config)
    engine = Engine(load_config(config), show_progress=False)
    futures: dict[str, Any] = {}
    for name in plan(engine, until, list(force)):
        upstream = [futures[u] for u in engine.stage(name).upstream if u in futures]
        futures[name] = stage_task(name).submit(config, force=name in force, wait_for=upstream)
    return [f.result() for f in futures.values()]


def stage_flow(stage: str) -> Flow:
    """The rerun flow of one stage (flow name = stage name): ensures upstream, then the stage."""
    if stage not in _FLOWS:
        def run(config: str, force: bool = False) -> dict[str, Any]:
            return stage_task(stage)(_absolute(config), force=force)

        run.__name__ = run.__qualname__ = f"{stage}_flow"
        run.__doc__ = f"Rerun stage `{stage}` (missing upstream stages first); `force` recomputes it."
        _FLOWS[stage] = flow(name=stage)(run)
        globals()[run.__name__] = _FLOWS[stage]  # importable as flows.curate:<stage>_flow
    return _FLOWS[stage]


def stage_flows() -> list[Flow]:
    """One rerun flow per registered stage, in DAG order."""
    return [stage_flow(name) for name in stage_names()]


stage_flows()
