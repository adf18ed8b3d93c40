"""Spherical k-means, hierarchical k-means with resampling and balanced sampling on planted clusters."""
import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from pipeline.vectors.kmeans import (balanced_sample, hierarchical_kmeans, resample, spherical_kmeans,
                                     water_fill)


def blobs(sizes, d, noise, seed):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((len(sizes), d))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    x = centers[labels] + noise * rng.standard_normal((len(labels), d)) / np.sqrt(d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def test_spherical_kmeans_recovers_planted_blobs_deterministically():
    x, labels = blobs([500] * 5, 32, 0.5, 1)
    centroids, assign, sim = spherical_kmeans(x, 5, seed=0, nredo=5)
    assert adjusted_rand_score(labels, assign) >= 0.95
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1, atol=1e-5)
    all_sims = x @ centroids.T
    assert (assign == all_sims.argmax(1)).all()
    np.testing.assert_allclose(sim, all_sims.max(1), atol=1e-5)
    again = spherical_kmeans(x, 5, seed=0, nredo=5)
    for a, b in zip((centroids, assign, sim), again):
        np.testing.assert_array_equal(a, b)


def test_spherical_kmeans_trains_on_a_sample_but_assigns_every_row():
    x, labels = blobs([1500] * 4, 16, 0.4, 2)
    c1, a1, _ = spherical_kmeans(x.astype(np.float16), 4, seed=3, nredo=3, max_points_per_centroid=100)
    c2, a2, _ = spherical_kmeans(x.astype(np.float16), 4, seed=3, nredo=3, max_points_per_centroid=100)
    assert len(a1) == len(x) and (a1 == a2).all() and (c1 == c2).all()
    assert adjusted_rand_score(labels, a1) >= 0.95
    with pytest.raises(ValueError, match="k"):
        spherical_kmeans(x[:3], 4)


def test_water_fill_splits_equally_and_redistributes_what_small_children_cannot_use():
    rng = np.random.default_rng(0)
    parent = np.zeros(4, np.int64)
    sizes = np.array([1000, 10, 50, 500])
    assert water_fill(parent, sizes, np.array([400]), rng).tolist() == [170, 10, 50, 170]
    odd = water_fill(parent, sizes, np.array([401]), rng)
    assert odd.sum() == 401 and sorted(odd.tolist()) == [10, 50, 170, 171]
    assert water_fill(parent, sizes, np.array([1560]), rng).tolist() == sizes.tolist()
    # two parents at once, each split on its own
    take = water_fill(np.array([0, 0, 1, 1, 1]), np.array([5, 100, 3, 3, 90]), np.array([20, 30]), rng)
    assert take.tolist() == [5, 15, 3, 3, 24]


def test_resample_closest_takes_the_points_nearest_each_centroid():
    assign = np.array([0, 0, 0, 1, 1, 2])
    sim = np.array([0.1, 0.9, 0.5, 0.3, 0.8, 0.2], np.float32)
    rows = resample(assign, sim, 3, 2, "closest", np.random.default_rng(0))
    assert rows.tolist() == [1, 2, 3, 4, 5]
    assert len(resample(assign, sim, 3, 1, "random", np.random.default_rng(0))) == 3


@pytest.fixture(scope="module")
def huge_and_small():
    """One cluster of 4000 points and five of 80 (the huge one is 91 % of the data)."""
    x, labels = blobs([4000] + [80] * 5, 32, 0.6, 0)
    levels = hierarchical_kmeans(x, [30, 6], niter=10, resampling_steps=[0, 3], seed=0, nredo=5)
    return x, labels, levels


def test_hierarchical_levels_are_consistent(huge_and_small):
    x, _, levels = huge_and_small
    assert [len(lv.centroids) for lv in levels] == [30, 6]
    for lv in levels:
        np.testing.assert_allclose(np.linalg.norm(lv.centroids, axis=1), 1, atol=1e-5)
        assert len(lv.assign) == len(x)
    assert (levels[0].input_assign == levels[0].assign).all() and len(levels[1].input_assign) == 30
    assert (levels[1].assign == levels[1].input_assign[levels[0].assign]).all()  # via the parent cluster
    inputs = levels[0].centroids @ levels[1].centroids.T  # level 2 clusters level-1 centroids
    assert (levels[1].input_assign == inputs.argmax(1)).all()
    np.testing.assert_allclose(levels[1].input_sim, inputs.max(1), atol=1e-5)
    again = hierarchical_kmeans(x, [30, 6], niter=10, resampling_steps=[0, 3], seed=0, nredo=5)
    assert all((a.assign == b.assign).all() for a, b in zip(levels, again))


def test_balanced_sampling_is_uniform_over_top_clusters_unlike_random(huge_and_small):
    x, labels, levels = huge_and_small
    picked = balanced_sample(levels, 300, "closest", seed=0)
    assert len(picked) == 300 == len(set(picked.tolist()))
    top = np.bincount(levels[-1].assign[picked], minlength=6)
    assert top.tolist() == [50] * 6  # every top cluster holds > 50 points
    planted = np.bincount(labels[picked], minlength=6) / 300
    uniform = np.bincount(labels[np.random.default_rng(0).choice(len(x), 300, replace=False)], minlength=6) / 300
    assert uniform[0] > 0.85 and uniform[1:].max() < 0.05
    assert planted[0] <= 0.5 and planted[1:].min() >= 0.05  # the small clusters get a real share
    assert balanced_sample(levels, 10**6).tolist() == list(range(len(x)))


def test_closest_and_random_leaf_strategies(huge_and_small):
    x, _, levels = huge_and_small
    leaf = levels[0]
    closest = balanced_sample(levels, 300, "closest", seed=4)
    random_a = balanced_sample(levels, 300, "random", seed=4)
    # same budgets per level-1 cluster (the split does not depend on the leaf strategy)
    assert (np.bincount(leaf.assign[closest], minlength=30) == np.bincount(leaf.assign[random_a], minlength=30)).all()
    chosen = np.zeros(len(x), bool)
    chosen[closest] = True
    for c in range(30):  # closest: every chosen point is at least as near its centroid as any left out
        members = leaf.assign == c
        if chosen[members].any() and (~chosen[members]).any():
            assert leaf.input_sim[members & chosen].min() >= leaf.input_sim[members & ~chosen].max()
    assert leaf.input_sim[closest].mean() > leaf.input_sim[random_a].mean()
    assert (balanced_sample(levels, 300, "random", seed=4) == random_a).all()
    assert not (balanced_sample(levels, 300, "random", seed=5) == random_a).all()
    with pytest.raises(ValueError, match="strategy"):
        balanced_sample(levels, 10, "farthest")
