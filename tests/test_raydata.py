"""Cutting Ray Data's ordered output back into shards, and map_shards on a real local Ray."""
import pyarrow as pa
import pytest

from pipeline.engine.store import ShardRef
from pipeline.raydata import RayResourcesError, _regroup, map_shards, pool_size
from pipeline.config import RayDataConfig

SCHEMA = pa.schema([("x", pa.int64())])


def _batch(pairs):
    return pa.table({"x": [x for _, x in pairs], "_shard": pa.array([s for s, _ in pairs], pa.int32())})


def test_regroup_spans_batches_and_fills_empty_shards():
    inputs = [(10, None), (11, None), (12, None), (13, None)]
    batches = [_batch([(0, 1), (0, 2)]), _batch([(0, 3), (2, 4)]), _batch([(2, 5)])]
    out = [(i, t["x"].to_pylist()) for i, t in _regroup(iter(batches), inputs, SCHEMA)]
    assert out == [(10, [1, 2, 3]), (11, []), (12, [4, 5]), (13, [])]


def test_regroup_with_no_rows_at_all():
    out = list(_regroup(iter([]), [(0, None), (1, None)], SCHEMA))
    assert [(i, t.num_rows) for i, t in out] == [(0, 0), (1, 0)]


def _double(batch: pa.Table) -> pa.Table:
    return pa.table({"x": pa.compute.multiply(batch["x"], 2), "_shard": batch["_shard"]})


def test_map_shards_reads_verified_shards_and_keeps_order(tmp_path, ray_session):
    from pipeline.engine import store

    refs = []
    for k, rows in enumerate([[1, 2, 3], [], [4], [5, 6]]):
        entry = store.write_shard(tmp_path, k, pa.table({"x": pa.array(rows, pa.int64())}))
        refs.append((k, ShardRef("toy", str(tmp_path), entry)))
    out = list(map_shards(refs, _double, RayDataConfig(batch_size=2), SCHEMA, columns=["x"]))
    assert [(i, t["x"].to_pylist()) for i, t in out] == [(0, [2, 4, 6]), (1, []), (2, [8]), (3, [10, 12])]


def test_pool_size_follows_free_cpus_gpus_settings_and_inputs(monkeypatch):
    import ray

    free = {"CPU": 8.0, "GPU": 2.0}
    monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 4.0})
    assert pool_size(RayDataConfig(num_cpus=1), 100) == 8
    assert pool_size(RayDataConfig(num_cpus=0.5), 100) == 16
    assert pool_size(RayDataConfig(num_cpus=1), 3) == 3
    assert pool_size(RayDataConfig(concurrency=32), 5) == 5
    assert pool_size(RayDataConfig(num_cpus=1, num_gpus=1), 100) == 2  # bounded by the free GPUs
    assert pool_size(RayDataConfig(num_cpus=1, num_gpus=0.25), 100) == 8  # four share a GPU: CPUs bound it
    free["GPU"] = 0.0  # all busy (another stage): one actor, which waits for a GPU
    assert pool_size(RayDataConfig(num_gpus=1), 100) == 1


def test_gpu_actors_on_a_cluster_without_gpus_fail_with_what_to_change(tmp_path, ray_session):
    from pipeline.engine import StageError, store

    with pytest.raises(RayResourcesError, match=r"num_gpus is 1 per actor but the Ray cluster has 0 GPUs.*num_gpus: 0"):
        pool_size(RayDataConfig(num_gpus=1), 4)
    entry = store.write_shard(tmp_path, 0, pa.table({"x": pa.array([1], pa.int64())}))
    with pytest.raises(StageError, match="GPU nodes"):  # before anything is submitted: it would wait forever
        list(map_shards([(0, ShardRef("toy", str(tmp_path), entry))], _double, RayDataConfig(num_gpus=0.5), SCHEMA))
