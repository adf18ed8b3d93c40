"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically.

Layout under a checkpoint root (on storage every worker sees; the run root on one machine)::

    step-0000200/      .metadata + one __<rank>_0.distcp file per worker, and state.json
    latest             the name of the newest complete checkpoint (replaced atomically)

A checkpoint is written into ``.tmp-step-…`` by every worker, then worker 0 adds ``state.json``
(step, schedule state, high-resolution phase, data position, anything JSON-able) and renames the
directory: a checkpoint is either complete or invisible. ``latest`` is rewritten after the
rename; older checkpoints beyond ``keep`` are deleted. A killed run resumes from ``latest``
(or, if that file was lost, from the highest complete ``step-*``).

The tensor state is the model's and the optimizers' state dicts as
``torch.distributed.checkpoint.state_dict`` returns them (full names, DTensor shards under FSDP2),
so a checkpoint can be loaded by a different number of workers.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

LATEST = "latest"
STATE_JSON = "state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _broadcast_str(value: str) -> str:
    if not _dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / ".metadata").is_file() and (path / STATE_JSON).is_file()


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (``latest`` first, else the highest ``step-*``)."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if _complete(candidate):
            return candidate
    steps = sorted((p for p in root.glob(f"{PREFIX}*") if _complete(p)), key=lambda p: p.name)
    return steps[-1] if steps else None


def read_state(path: str | Path) -> dict[str, Any]:
    """The JSON part (step, schedules, …) of a checkpoint."""
    return json.loads((Path(path) / STATE_JSON).read_text())


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, model: nn.Module, optimizers: list[torch.optim.Optimizer],
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Collective: every worker writes its shards; worker 0 publishes ``step-<step>`` and ``latest``."""
    root = Path(root)
    final = root / step_dir_name(step)
    tmp_name = _broadcast_str(f"{TMP_PREFIX}{step_dir_name(step)}-{uuid.uuid4().hex[:8]}")
    tmp = root / tmp_name
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    _barrier()
    model_sd, optim_sd = get_state_dict(model, optimizers)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / STATE_JSON).write_text(json.dumps({**state, "step": step}, indent=1, sort_keys=True))
        if final.exists():  # a re-save of the same step (e.g. after a restart): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / LATEST, final.name + "\n")
        _prune(root, keep)
    _barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    complete = sorted((p for p in root.glob(f"{PREFIX}*") if _complete(p)), key=lambda p: p.name)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in root.glob(f"{TMP_PREFIX}*"):  # leftovers of a run killed while saving
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)


def load_checkpoint(path: str | Path, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Collective: load model and optimizer state in place (resharding as needed); returns the JSON state."""
    model_sd, optim_sd = get_state_dict(model, optimizers)
    # Parameters that had no optimizer state when saved (e.g. the prototype layer while it is frozen)
    # must have none after loading either: get_state_dict initialises every state, which would
    # change AdamW's step count (bias correction) and break exact resume.
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    stateless = [fqn for fqn in optim_sd.get("state", {}) if not any(k.startswith(f"optim.state.{fqn}.") for k in saved)]
    for fqn in stateless:
        del optim_sd["state"][fqn]
    box = {"model": model_sd, "optim": optim_sd}
    dcp.load(box, checkpoint_id=str(path))
    # every model key was loaded by dcp.load (it fails on a missing one); strict=False only lets the
    # optimizer state of the stateless parameters be absent
    set_state_dict(model, optimizers, model_state_dict=box["model"], optim_state_dict=box["optim"],
                   options=StateDictOptions(strict=not stateless))
    params = dict(model.named_parameters())
    for fqn in stateless:
        for opt in optimizers:
            opt.state.pop(params[fqn], None)
    return read_state(path)


def clean_partial(root: str | Path) -> int:
    """Remove ``.tmp-*`` directories of interrupted saves (worker 0, before training starts)."""
    root = Path(root)
    n = 0
    if _rank() == 0 and root.is_dir():
        for tmp in root.glob(f"{TMP_PREFIX}*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            n += 1
    _barrier()
    return n
