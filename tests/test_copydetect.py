"""Copy-detection dedup and decontamination on random vectors with planted near-copies."""
import numpy as np
import pytest

from pipeline.vectors.copydetect import copy_components, decontaminate, pick_kept
from pipeline.vectors.index import IndexSpec


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_cosine(u, c, rng):
    """A unit vector at exactly cosine c to the unit vector u."""
    v = rng.standard_normal(len(u))
    v -= (v @ u) * u
    return c * u + np.sqrt(1 - c * c) * v / np.linalg.norm(v)


def planted_pool(seed=0, n=2000, d=128):
    """Random rows plus: 10 pairs at cosine 0.8 (copies), 10 at 0.5 (not), one chain a~b~c
    (a·b = b·c ≈ 0.81, a·c = 0.3) and four identical rows."""
    rng = np.random.default_rng(seed)
    x = unit(rng, n, d)
    above = [(2 * p, 2 * p + 1) for p in range(10)]
    below = [(100 + 2 * p, 100 + 2 * p + 1) for p in range(10)]
    for i, j in above:
        x[j] = at_cosine(x[i], 0.8, rng)
    for i, j in below:
        x[j] = at_cosine(x[i], 0.5, rng)
    a, b, c = 200, 201, 202
    x[c] = at_cosine(x[a], 0.3, rng)
    x[b] = (x[a] + x[c]) / np.linalg.norm(x[a] + x[c])
    x[300:304] = x[300]
    chain = [(a, b), (b, c)]
    same = [(i, j) for i in range(300, 304) for j in range(i + 1, 304)]
    return x.astype(np.float32), above, below, chain, same


@pytest.mark.parametrize("spec", [IndexSpec(), IndexSpec(kind="ivf", nlist=8, nprobe=8)])
def test_exactly_the_pairs_above_threshold_are_joined(spec):
    x, above, below, chain, same = planted_pool()
    sims = x @ x.T
    iu, ju = np.triu_indices(len(x), 1)
    brute = sorted(zip(iu[sims[iu, ju] > 0.6].tolist(), ju[sims[iu, ju] > 0.6].tolist()))
    assert brute == sorted(above + chain + same)  # the random background has no pair above 0.6

    graph = copy_components(x, k=64, threshold=0.6, spec=spec)
    assert sorted(zip(graph.edge_i.tolist(), graph.edge_j.tolist())) == brute
    assert (graph.edge_i < graph.edge_j).all()
    np.testing.assert_allclose(graph.edge_sim, sims[graph.edge_i, graph.edge_j], atol=1e-5)
    labels = graph.labels
    for i, j in above:
        assert labels[i] == labels[j]
    for i, j in below:
        assert labels[i] != labels[j]
    assert labels[200] == labels[201] == labels[202]  # a~b~c although a·c = 0.3
    assert len(set(labels[300:304].tolist())) == 1
    assert len(set(labels.tolist())) == len(x) - 10 - 2 - 3


def test_threshold_is_strict_and_k_bounds_the_neighbours():
    rng = np.random.default_rng(1)
    x = unit(rng, 50, 64).astype(np.float32)
    x[1] = at_cosine(x[0].astype(np.float64), 0.7, rng)
    g = copy_components(x, k=4, threshold=float(x[0] @ x[1]))  # cosine equal to the threshold: no edge
    assert len(g.edge_i) == 0
    x[10:20] = x[10]  # ten identical rows, k = 2: edges only to two others each, still one component
    g = copy_components(x, k=2, threshold=0.6)
    assert len(set(g.labels[10:20].tolist())) == 1
    block = (g.edge_i >= 10) & (g.edge_j < 20)
    assert 9 <= block.sum() <= 10 * 2  # connected, and at most k directed edges per row
    assert sorted(zip(g.edge_i[~block].tolist(), g.edge_j[~block].tolist())) == [(0, 1)]  # 0.7 > 0.6
    assert (g.edge_i != g.edge_j).all()


def test_pick_kept_is_deterministic_smallest_rank_then_row():
    labels = np.array([0, 1, 0, 2, 1, 0, 2])
    rank = np.array([5, 3, 1, 9, 3, 7, 0])
    kept = pick_kept(labels, rank)
    assert kept.tolist() == [2, 1, 2, 6, 1, 2, 6]  # label 1: rank tie → the smaller row (1)
    assert (pick_kept(labels, rank) == kept).all()
    x, above, *_ = planted_pool()
    g = copy_components(x)
    kept = pick_kept(g.labels, np.arange(len(x)))
    assert all(kept[i] == kept[j] == i for i, j in above)
    assert (kept == np.arange(len(x))).sum() == len(set(g.labels.tolist()))


def planted_eval(seed=0, n=3000, d=256):
    rng = np.random.default_rng(seed)
    pool = unit(rng, n, d)
    evals = {"imagenet": unit(rng, 100, d), "places": unit(rng, 50, d)}
    plant = {}  # pool row → (source, eval row, cosine)
    for r in range(10):
        plant[r] = ("imagenet", 3 * r, 0.5)
        plant[10 + r] = ("imagenet", 3 * r + 1, 0.4)
    for r in range(5):
        plant[20 + r] = ("places", 7 * r, 0.5)
        plant[25 + r] = ("places", 7 * r + 1, 0.4)
    for row, (src, erow, c) in plant.items():
        pool[row] = at_cosine(evals[src][erow], c, rng)
    f32 = {k: v.astype(np.float32) for k, v in evals.items()}
    return pool.astype(np.float32), f32, plant


@pytest.mark.parametrize("direction", ["auto", "index_eval", "index_uncurated"])
def test_decontamination_removes_exactly_the_near_copies_above_threshold(direction):
    pool, evals, plant = planted_eval()
    result = decontaminate(pool, evals, threshold=0.45, direction=direction, batch=700)
    assert result.direction == ("index_eval" if direction == "auto" else direction)
    expected = sorted(r for r, (_, _, c) in plant.items() if c > 0.45)
    assert np.flatnonzero(result.removed).tolist() == expected
    assert result.removed_by == {"imagenet": 10, "places": 5}
    assert result.matches == {"imagenet": 10, "places": 5}
    for r in expected:
        src, erow, _ = plant[r]
        assert result.sources[result.source[r]] == src and result.eval_row[r] == erow
        assert result.source_names()[r] == src
        assert abs(result.best_sim[r] - 0.5) < 1e-4
    brute = np.maximum((pool @ evals["imagenet"].T).max(1), (pool @ evals["places"].T).max(1))
    if result.direction == "index_eval":  # the full best similarity of every row
        np.testing.assert_allclose(result.best_sim, brute, atol=1e-5)
        assert (result.source >= 0).all()
    else:  # only rows above the threshold have a match
        assert (result.source[~result.removed] == -1).all() and np.isneginf(result.best_sim[~result.removed]).all()


def test_decontamination_prefers_indexing_the_smaller_side_and_handles_empty_sets():
    pool, evals, _ = planted_eval(n=80, d=256)  # fewer pool rows than eval images: the pool is indexed
    result = decontaminate(pool, evals)
    assert result.direction == "index_uncurated"
    assert decontaminate(pool, {"none": np.empty((0, 256), np.float32)}).removed.sum() == 0
    empty = decontaminate(np.empty((0, 256), np.float32), evals)
    assert len(empty.removed) == 0 and empty.removed_by == {"imagenet": 0, "places": 0}
