"""Serve the deployments of one run config: `curate-and-train/<name>` and `<stage>/<name>`."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

from prefect import serve as prefect_serve
from prefect.deployments.runner import RunnerDeployment

from flows.curate import curate_and_train, stage_flows
from pipeline.config import load_config


def deployments(config_path: str) -> list[RunnerDeployment]:
    """The deployments of a config: the whole DAG, then one rerun deployment per stage."""
    path = str(Path(config_path).expanduser().resolve())
    name = load_config(path).name
    params = {"config": path}
    whole = curate_and_train.to_deployment(
        name=name, parameters=params, tags=["lvd", name],
        description=f"Every stage of {path} (set `until` to stop early, `force` to recompute stages).")
    per_stage = [f.to_deployment(name=name, parameters=params, tags=["lvd", name],
                                 description=f"Rerun stage `{f.name}` of {path}.") for f in stage_flows()]
    return [whole, *per_stage]


def serve(config_path: str) -> None:
    """Serve the config's deployments from this process until interrupted (blocking)."""
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lvd")  # flow-run subprocesses inherit it
    prefect_serve(*deployments(config_path))


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m flows.serve --config CFG`."""
    parser = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__)
    parser.add_argument("--config", required=True, help="run YAML")
    serve(parser.parse_args(argv).config)


if __name__ == "__main__":
    main()
