"""The per-rank sample plan: shards, passes, O(1) random access, errors (pure Python, no Ray)."""
import itertools
import pickle

import pytest

from model.data.sampling import SamplePlan, Unit, assign_units, split_units, subsets_per_file

# (row counts, world size): whole files, files split into row subsets, empty files, one row per rank
CASES = [([5, 7, 3, 9], 1), ([5, 7, 3, 9], 2), ([5, 7, 3, 9], 4), ([10], 3), ([4, 0, 6], 5), ([1, 1, 1], 3),
         ([3, 1], 4), ([8, 8], 16)]


def plans(counts, world_size, batch_size=3, seed=0):
    return [SamplePlan(counts, world_size=world_size, rank=r, batch_size=batch_size, seed=seed)
            for r in range(world_size)]


def all_rows(counts):
    return {(f, r) for f, n in enumerate(counts) for r in range(n)}


@pytest.mark.parametrize("counts,world_size", CASES)
def test_every_row_once_per_pass_and_ranks_disjoint(counts, world_size):
    ps = plans(counts, world_size)
    assert sum(p.images_per_pass for p in ps) == sum(counts)
    assert all(p.images_per_pass >= 1 for p in ps)
    owned = [set(p.pass_order(0)) for p in ps]
    assert set().union(*owned) == all_rows(counts)
    assert sum(len(o) for o in owned) == sum(counts)  # disjoint
    for p, mine in zip(ps, owned):
        for k in range(3):
            order = p.pass_order(k)
            assert len(order) == p.images_per_pass and set(order) == mine  # each of its rows exactly once


@pytest.mark.parametrize("counts,world_size", CASES)
def test_batches_are_the_passes_concatenated(counts, world_size):
    for p in plans(counts, world_size, batch_size=4):
        stream = list(itertools.chain.from_iterable(p.batch(t) for t in range(6)))
        passes = list(itertools.chain.from_iterable(p.pass_order(k) for k in range(30)))
        assert stream == passes[:len(stream)]
        assert [p.position(i) for i in range(len(stream))] == stream


def test_random_access_equals_sequential():
    counts = [50, 70, 30, 90, 20]
    sequential = SamplePlan(counts, world_size=3, rank=1, batch_size=8, seed=5)
    expected = {t: sequential.batch(t) for t in range(60)}
    fresh = SamplePlan(counts, world_size=3, rank=1, batch_size=8, seed=5, cache_size=1)
    for t in [59, 3, 41, 0, 17, 58, 3]:
        assert fresh.batch(t) == expected[t]
    far = fresh.batch(10**12)  # no iteration from 0
    assert len(far) == 8 and set(far) <= set(sequential.pass_order(0))


def test_each_file_is_read_in_one_run_per_pass():
    p = SamplePlan([6, 5, 7, 4, 9, 3], world_size=2, rank=0, batch_size=4, seed=1)
    for k in range(4):
        runs = [f for f, _ in itertools.groupby(f for f, _ in p.pass_order(k))]
        assert len(runs) == len(set(runs)) == len(p.files)


def test_passes_seeds_and_ranks_differ():
    counts = [40, 40, 40, 40]
    a = SamplePlan(counts, world_size=2, rank=0, batch_size=8, seed=0)
    assert a.pass_order(0) != a.pass_order(1)
    assert a.pass_order(0) != SamplePlan(counts, world_size=2, rank=0, batch_size=8, seed=1).pass_order(0)
    b = SamplePlan(counts, world_size=2, rank=1, batch_size=8, seed=0)
    assert not set(a.batch(0)) & set(b.batch(0))
    assert a.epoch(5) == 5 * 8 / 80


def test_units_are_whole_files_when_there_are_enough_files():
    assert subsets_per_file([5, 0, 7, 3], 3) == 1
    assert split_units([5, 0, 7, 3], 3) == [Unit(0, 0, 1), Unit(2, 0, 1), Unit(3, 0, 1)]
    assert [len(us) for us in assign_units([5, 0, 7, 3], 3)] == [1, 1, 1]


def test_files_are_split_into_row_subsets_when_there_are_fewer_files_than_ranks():
    assert subsets_per_file([10], 3) == 3
    ps = plans([10], 3)
    assert [sorted(r for _, r in p.pass_order(0)) for p in ps] == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert subsets_per_file([3, 1], 4) == 3  # min(K, 3) + min(K, 1) >= 4


def test_a_rank_with_fewer_rows_than_the_batch_repeats_them_across_passes():
    p = SamplePlan([3], world_size=1, rank=0, batch_size=7, seed=0)
    b = p.batch(0)
    assert len(b) == 7 and set(b) == all_rows([3])
    assert b == (p.pass_order(0) + p.pass_order(1) + p.pass_order(2))[:7]


def test_plan_pickles():
    p = SamplePlan([5, 6, 7], world_size=2, rank=1, batch_size=3, seed=9)
    q = pickle.loads(pickle.dumps(p))
    assert [q.batch(t) for t in range(5)] == [p.batch(t) for t in range(5)]


@pytest.mark.parametrize("kwargs,match", [
    (dict(row_counts=[]), "no rows"),
    (dict(row_counts=[0, 0]), "no rows"),
    (dict(row_counts=[1, 1], world_size=3, rank=0), r"2 rows in 2 files, fewer than world_size=3"),
    (dict(row_counts=[3, -1]), ">= 0"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(rank=2), r"rank must be in \[0, 2\)"),
    (dict(rank=-1), r"rank must be in \[0, 2\)"),
    (dict(world_size=0, rank=0), "world_size must be >= 1"),
    (dict(seed=-1), "seed must be >= 0"),
])
def test_errors(kwargs, match):
    args = dict(row_counts=[4, 4], world_size=2, rank=0, batch_size=2, seed=0) | kwargs
    with pytest.raises(ValueError, match=match):
        SamplePlan(args.pop("row_counts"), **args)


def test_negative_positions_and_steps_are_errors():
    p = SamplePlan([4], world_size=1, rank=0, batch_size=2, seed=0)
    with pytest.raises(ValueError, match="steps are >= 0"):
        p.batch(-1)
    with pytest.raises(ValueError, match="positions are >= 0"):
        p.position(-1)
