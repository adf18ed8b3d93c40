"""Run a function in N local processes joined by a gloo process group (for 2-process unit tests).

``run_distributed(fn, out_dir, *args)`` spawns ``world_size`` processes (``torch.multiprocessing``,
spawn start method), each of which sets ``MASTER_ADDR=127.0.0.1`` / ``MASTER_PORT=<a free port>``,
joins a gloo group, uses one intra-op thread (the machine has few cores), calls
``fn(rank, world_size, *args)`` and saves its return value with ``torch.save``. The parent returns
the ranks' return values in rank order. A failing worker's traceback is re-raised in the parent;
workers that hang are killed after ``timeout`` seconds (a guard against deadlocks, generous because
this machine is shared: not a speed check). A port taken between ``free_port`` and the rendezvous
is retried with another port.

``fn`` must be a module-level function of an importable module (test modules are: pytest puts
``tests/`` on ``sys.path`` and spawn passes ``sys.path`` to the children).
"""
from __future__ import annotations

import os
import socket
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, port: int, out_dir: str, args: tuple,
           timeout: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # as model.train.worker: our backbones return dicts of views of their outputs, never modified in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:
        (Path(out_dir) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    torch.save(result, Path(out_dir) / f"result-{rank}.pt")


def run_distributed(fn: Callable[..., Any], out_dir: str | Path, *args: Any, world_size: int = 2,
                    timeout: float = 300.0) -> list[Any]:
    """``[fn(0, world_size, *args), fn(1, world_size, *args), …]``, each computed in its own process."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):
        for r in range(world_size):
            (out_dir / f"result-{r}.pt").unlink(missing_ok=True)
            (out_dir / f"error-{r}.txt").unlink(missing_ok=True)
        try:
            _run(fn, out_dir, args, world_size, timeout)
            break
        except mp.ProcessRaisedException as err:
            errors = {r: (out_dir / f"error-{r}.txt").read_text() for r in range(world_size)
                      if (out_dir / f"error-{r}.txt").is_file()}
            if attempt < 2 and "address already in use" in (str(err) + "".join(errors.values())).lower():
                continue
            # every rank's traceback: the first one reported may only be a peer noticing the real failure
            report = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RuntimeError(f"{fn.__name__} failed on {len(errors) or 'some'} of {world_size} processes:\n"
                               f"{report or err}") from err
    return [torch.load(out_dir / f"result-{r}.pt", weights_only=False) for r in range(world_size)]


def _run(fn: Callable[..., Any], out_dir: Path, args: tuple, world_size: int, timeout: float) -> None:
    ctx = mp.start_processes(_entry, args=(fn, world_size, free_port(), str(out_dir), args, timeout),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{fn.__name__} did not finish within {timeout:.0f} s on {world_size} processes")
    finally:
        for p in ctx.processes:  # only our own children; no-op when they have exited
            if p.is_alive():
                p.kill()
                p.join()
