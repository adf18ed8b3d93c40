"""Ray glue shared by every per-image stage: connect to Ray, and map a function over shards.

``map_shards`` reads upstream shards inside Ray tasks (checksums verified there, through the
engine's ``ShardRef``), streams the rows through ``map_batches`` (an actor pool when the
function is a class, so a model loads once per actor), and hands back one output table per
input shard, in input order, as soon as that shard is complete. Memory stays bounded by Ray
Data's streaming executor, never by the corpus size.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config, RayDataConfig
from pipeline.engine import StageError
from pipeline.engine.store import ShardRef

log = logging.getLogger("lvd")
SHARD_COL = "_shard"
READ_CPUS = 0  # reading is I/O: never wait for a CPU the model actors hold
RAY_ONLY = frozenset({"batch_size", "concurrency", "num_cpus", "num_gpus"})  # how fast / where, not what: not fingerprinted


class RayResourcesError(StageError):
    """The Ray cluster cannot ever give a stage's actors what they ask for."""


def pool_size(settings: RayDataConfig, n_inputs: int) -> int:
    """Actors (or tasks) to run at once: ``settings.concurrency``, else as many as the cluster's free CPUs —
    and, when they ask for GPUs, its GPUs — can hold; never more than there are inputs."""
    import ray

    if settings.num_gpus > 0:
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if gpus < settings.num_gpus:
            raise RayResourcesError(
                f"num_gpus is {settings.num_gpus:g} per actor but the Ray cluster has {gpus:g} GPUs: add GPU nodes "
                f"(RAY_ADDRESS of a cluster with GPUs) or set this stage's num_gpus: 0 and device: cpu")
    free = ray.available_resources()
    size = max(1, int(free.get("CPU", 1) // settings.num_cpus))
    if settings.num_gpus > 0:
        size = min(size, max(1, int(free.get("GPU", 0.0) // settings.num_gpus)))
    return max(1, min(settings.concurrency or size, n_inputs))


def ensure_ray(config: Config) -> None:
    """Connect to Ray once per process: RAY_ADDRESS, else ``ray.address``, else a local instance."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS") or config.ray.address
    kwargs: dict[str, Any] = {"ignore_reinit_error": True, "log_to_driver": False,
                              "configure_logging": False, "include_dashboard": False}
    if address:
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        ray.init(address="local", num_cpus=config.ray.num_cpus, **kwargs)  # a new instance, never a stray one
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # shards come back in input order: deterministic output
    ctx.enable_progress_bars = True


def _read_shard(batch: pa.Table, columns: list[str] | None, only_ok: bool) -> pa.Table:
    """One input row names a shard: read it (verified) and tag its rows with the shard's position."""
    tables = []
    for row in batch.to_pylist():
        position, ref = row.pop("position"), ShardRef.from_row(row)
        t = ref.read(columns)
        if only_ok:
            t = t.filter(pc.equal(t["status"], "ok"))
        tables.append(t.append_column(SHARD_COL, pa.array([position] * t.num_rows, pa.int32())))
    return pa.concat_tables(tables)


def map_shards(inputs: list[tuple[int, ShardRef]], fn: Callable | type, settings: RayDataConfig, schema: pa.Schema, *,
               fn_kwargs: dict | None = None, columns: list[str] | None = None,
               only_ok: bool = False) -> Iterator[tuple[int, pa.Table]]:
    """Apply ``fn`` (pyarrow table → pyarrow table, keeping ``_shard``) to the rows of each input shard.

    ``inputs`` pairs an output shard index with the upstream shard it is computed from. Yields
    ``(index, table)`` per input in order (an empty table when a shard has no rows to map).
    """
    import ray

    if not inputs:
        return
    ds = ray.data.from_items([{"position": i, **ref.to_row()} for i, (_, ref) in enumerate(inputs)],
                             override_num_blocks=len(inputs))
    if only_ok and columns and "status" not in columns:
        columns = [*columns, "status"]
    concurrency = pool_size(settings, len(inputs))
    # Reading is its own (light) task, one shard per task: given other resources than the map below,
    # Ray does not fuse the two, so the map's batches are of rows (not of shards) and flow per shard.
    # At most one read more than there are map workers runs at once: zero-CPU tasks are otherwise
    # unbounded, and each in flight costs a Ray worker process (memory grew with the shard count).
    ds = ds.map_batches(_read_shard, batch_size=1, batch_format="pyarrow", zero_copy_batch=True, num_cpus=READ_CPUS,
                        fn_kwargs={"columns": columns, "only_ok": only_ok},
                        compute=ray.data.TaskPoolStrategy(size=min(len(inputs), concurrency + 1)))
    is_class = isinstance(fn, type)
    # One task in flight per actor: an actor's finished shard is handed back before it starts the next
    # (with several queued, outputs were held back until the end of the run).
    compute = ray.data.ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=1) if is_class else None
    ds = ds.map_batches(fn, batch_size=settings.batch_size, batch_format="pyarrow", num_cpus=settings.num_cpus,
                        num_gpus=settings.num_gpus or None,
                        fn_constructor_kwargs=(fn_kwargs or {}) if is_class else None,
                        fn_kwargs=None if is_class else (fn_kwargs or {}), compute=compute)
    # prefetch_batches=0: hand each block over as soon as Ray Data has it (the default prefetching held
    # every output back to the end of the run here), so finished shards are written while others compute.
    yield from _regroup(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0), inputs, schema)


def _regroup(batches: Iterator[pa.Table], inputs: list[tuple[int, Any]], schema: pa.Schema) -> Iterator[tuple[int, pa.Table]]:
    """Cut an ordered stream of tagged rows back into one table per input shard."""
    pending: list[pa.Table] = []
    current = 0  # position of the shard being assembled

    def flush(upto: int) -> Iterator[tuple[int, pa.Table]]:
        nonlocal pending, current
        while current < upto:
            yield inputs[current][0], pa.concat_tables(pending) if pending else schema.empty_table()
            pending, current = [], current + 1

    for batch in batches:
        if batch.num_rows == 0:
            continue
        positions = batch[SHARD_COL].to_numpy()
        for pos in sorted(set(positions.tolist())):
            if pos < current:
                raise RuntimeError("Ray Data returned rows out of order; preserve_order must be on")
            yield from flush(pos)
            pending.append(batch.filter(pc.equal(batch[SHARD_COL], pos)).drop_columns([SHARD_COL]))
    yield from flush(current + 1 if pending else current)
    yield from flush(len(inputs))
