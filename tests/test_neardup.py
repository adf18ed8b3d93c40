"""FAISS binary range search, grouping and representatives on hand-made codes."""
import numpy as np
import pytest

from pipeline.neardup import group, near_duplicate_pairs, representatives


def _codes():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    codes[3] = codes[1]                      # distance 0 to 1
    codes[4] = codes[1] ^ np.array([3, 0, 0, 0, 0, 0, 0, 0], np.uint8)  # distance 2 to 1 and 3
    codes[6] = codes[4] ^ np.array([0, 0, 0, 0, 0, 0, 0, 7], np.uint8)  # distance 3 to 4, 5 to 1
    return codes


@pytest.mark.parametrize("kind", ["flat", "multihash"])
def test_pairs_within_radius_inclusive(kind):
    i, j, d = near_duplicate_pairs(_codes(), radius=3, kind=kind)
    pairs = sorted(zip(i.tolist(), j.tolist(), d.tolist()))
    assert pairs == [(1, 3, 0), (1, 4, 2), (3, 4, 2), (4, 6, 3)]


def test_radius_zero_finds_exact_code_matches_only():
    i, j, d = near_duplicate_pairs(_codes(), radius=0)
    assert list(zip(i, j, d)) == [(1, 3, 0)]


def test_multihash_refuses_a_radius_it_cannot_search_exactly():
    with pytest.raises(ValueError, match="flat"):
        near_duplicate_pairs(_codes(), radius=8, kind="multihash")


def test_group_is_transitive_and_representative_is_largest_then_first():
    i, j, _ = near_duplicate_pairs(_codes(), radius=3)
    labels = group(8, i, j)
    assert len({labels[k] for k in (1, 3, 4, 6)}) == 1 and len(set(labels.tolist())) == 5
    area = np.array([10, 50, 10, 80, 80, 10, 20, 10])
    reps = representatives(labels, area, np.arange(8))
    assert reps[[1, 3, 4, 6]].tolist() == [3, 3, 3, 3]  # area 80 twice: the smaller rank (3) wins
    assert reps[[0, 2, 5, 7]].tolist() == [0, 2, 5, 7]
