"""Sample-based and cluster-based retrieval on planted neighbours and clusters."""
import numpy as np
import pytest

from pipeline.vectors.index import IndexSpec, build_index
from pipeline.vectors.retrieval import choose_method, cluster_retrieval, sample_retrieval


def unit(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def at_cosine(u, c, rng):
    v = rng.standard_normal(len(u))
    v -= (v @ u) * u
    return c * u + np.sqrt(1 - c * c) * v / np.linalg.norm(v)


COSINES = (0.9, 0.8, 0.7, 0.6)


def planted_neighbours(seed=0, n=3000, d=128, n_queries=20):
    """Each query has four planted uncurated neighbours at cosines 0.9, 0.8, 0.7, 0.6 (random rows
    elsewhere: pairs reach ~0.45 at most)."""
    rng = np.random.default_rng(seed)
    pool = unit(rng, n, d)
    queries = unit(rng, n_queries, d)
    rows = rng.permutation(n)[: 4 * n_queries].reshape(n_queries, 4)
    for q in range(n_queries):
        for r, c in zip(rows[q], COSINES):
            pool[r] = at_cosine(queries[q], c, rng)
    return pool.astype(np.float32), queries.astype(np.float32), rows


@pytest.mark.parametrize("spec", [IndexSpec(), IndexSpec(kind="ivf", nlist=4, nprobe=4)])
def test_sample_retrieval_finds_exactly_the_planted_neighbours(spec):
    pool, queries, rows = planted_neighbours()
    hits = sample_retrieval(pool, queries, k=4, spec=spec)
    assert hits.method == "sample" and len(hits) == 80
    assert hits.query_row.tolist() == np.repeat(np.arange(20), 4).tolist()
    assert hits.rank.tolist() == [0, 1, 2, 3] * 20
    assert hits.uncurated_row.tolist() == rows.reshape(-1).tolist()
    np.testing.assert_allclose(hits.similarity, np.tile(COSINES, 20), atol=1e-5)
    assert (hits.cluster == -1).all() and (hits.query_similarity == hits.similarity).all()


def test_sample_retrieval_reuses_an_index_and_is_deterministic():
    pool, queries, rows = planted_neighbours(seed=1)
    index = build_index(pool, IndexSpec())
    a = sample_retrieval(pool, queries[:10], 2, index=index, batch=3)
    b = sample_retrieval(pool, queries[:10], 2)
    assert a.uncurated_row.tolist() == b.uncurated_row.tolist() == rows[:10, :2].reshape(-1).tolist()
    tiny = sample_retrieval(pool[:3], queries[:2], 5)  # fewer uncurated rows than k: no -1 rows
    assert len(tiny) == 6 and (tiny.uncurated_row >= 0).all()


def planted_clusters():
    """Ten clusters of uncurated rows (row r in cluster r % 10, similarity to its centroid
    decreasing with r, a tie in cluster 3) and queries hitting cluster 1 ×10, 4 ×5, 6 ×5,
    2 ×4, 7 ×3 (not more than 3: excluded) and 9 ×1."""
    n = 200
    assign = np.arange(n) % 10
    sim = np.linspace(0.99, 0.2, n).astype(np.float32)
    sim[13] = sim[3]  # tie inside cluster 3: the smaller row first
    query_assign = np.array([1] * 10 + [4] * 5 + [6] * 5 + [2] * 4 + [7] * 3 + [9])
    return assign, sim, query_assign


def test_cluster_retrieval_takes_closest_images_of_clusters_with_more_than_min_hits():
    assign, sim, query_assign = planted_clusters()
    hits = cluster_retrieval(query_assign, assign, sim, min_hits=3, per_cluster=3, cap=100)
    assert hits.method == "cluster"
    # clusters by hits desc then id: 1 (10), 4 (5), 6 (5), 2 (4); 7 has exactly 3 → not taken
    assert hits.cluster.tolist() == [1] * 3 + [4] * 3 + [6] * 3 + [2] * 3
    assert hits.uncurated_row.tolist() == [1, 11, 21, 4, 14, 24, 6, 16, 26, 2, 12, 22]
    assert hits.rank.tolist() == [0, 1, 2] * 4
    np.testing.assert_array_equal(hits.similarity, sim[hits.uncurated_row])
    assert (hits.query_row == -1).all() and np.isnan(hits.query_similarity).all()


def test_cluster_retrieval_caps_and_is_deterministic():
    assign, sim, query_assign = planted_clusters()
    hits = cluster_retrieval(query_assign, assign, sim, min_hits=3, per_cluster=3, cap=7)
    assert hits.uncurated_row.tolist() == [1, 11, 21, 4, 14, 24, 6]  # stops inside cluster 6
    every = cluster_retrieval(query_assign, assign, sim, min_hits=3, per_cluster=10_000, cap=10**6)
    assert len(every) == 4 * 20 and np.bincount(every.cluster).tolist()[1] == 20
    again = cluster_retrieval(query_assign, assign, sim, min_hits=3, per_cluster=10_000, cap=10**6, seed=9)
    assert every.uncurated_row.tolist() == again.uncurated_row.tolist()
    tie = cluster_retrieval(np.array([3] * 4), assign, sim, min_hits=3, per_cluster=2)
    assert tie.uncurated_row.tolist() == [3, 13]
    assert len(cluster_retrieval(np.array([5] * 3), assign, sim, min_hits=3)) == 0


def test_cluster_retrieval_names_the_nearest_query_in_the_cluster_when_given_vectors():
    rng = np.random.default_rng(0)
    assign, sim, query_assign = planted_clusters()
    pool = unit(rng, len(assign), 64).astype(np.float32)
    queries = unit(rng, len(query_assign), 64).astype(np.float32)
    hits = cluster_retrieval(query_assign, assign, sim, min_hits=3, per_cluster=5,
                             uncurated=pool, queries=queries)
    for row, c, q, qs in zip(hits.uncurated_row, hits.cluster, hits.query_row, hits.query_similarity):
        members = np.flatnonzero(query_assign == c)
        sims = queries[members] @ pool[row]
        assert q == members[sims.argmax()] and abs(qs - sims.max()) < 1e-5


def test_choose_method_follows_the_paper():
    assert choose_method("auto", 1_000_001) == "sample"
    assert choose_method("auto", 1_000_000) == "cluster"
    assert choose_method("auto", 50, threshold=10) == "sample"
    assert choose_method("cluster", 10**9) == "cluster" and choose_method("sample", 1) == "sample"
    with pytest.raises(ValueError, match="method"):
        choose_method("knn", 5)
