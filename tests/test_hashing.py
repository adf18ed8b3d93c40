"""PCA hash and pHash on real photos: invariances, determinism, Hamming distance."""
import numpy as np

from photos import generated, jpeg, photo, variants
from pipeline.hashing import augment, fit_pca, hamming, normalise, pca_hash, phash, thumbnail


def test_thumbnail_is_grayscale_and_handles_garbage():
    t = thumbnail(jpeg(photo("coffee")), 16)
    assert t.shape == (256,) and t.dtype == np.uint8
    assert thumbnail(b"not an image", 16) is None


def test_normalise_removes_brightness_and_contrast():
    x = np.arange(16, dtype=np.float32)[None]
    assert np.allclose(normalise(x), normalise(x * 3 + 40), atol=1e-5)


def test_augment_adds_mirrored_and_shifted_copies():
    x = np.arange(2 * 16, dtype=np.uint8).reshape(2, 16)
    out = augment(x)
    assert out.shape == (2 * 8, 16) and (out[:2] == x).all()
    assert (out[2].reshape(4, 4) == x[0].reshape(4, 4)[:, ::-1]).all()


def test_fit_pca_is_deterministic_with_fixed_signs_and_orthonormal():
    thumbs = np.stack([thumbnail(generated(s), 16) for s in range(40)])
    m1, c1 = fit_pca(thumbs, 32)
    m2, c2 = fit_pca(thumbs.copy(), 32)
    assert np.array_equal(c1, c2) and np.array_equal(m1, m2)
    assert np.allclose(c1 @ c1.T, np.eye(32), atol=1e-4)
    assert (c1[np.arange(32), np.abs(c1).argmax(1)] > 0).all()


def test_fit_pca_streams_in_chunks_and_equals_a_dense_svd():
    thumbs = np.stack([thumbnail(generated(s), 16) for s in range(60)])
    mean, comps = fit_pca(thumbs, 16)
    m_small, c_small = fit_pca(thumbs, 16, chunk=7)  # chunking changes only the order of the sums
    assert np.allclose(c_small, comps, atol=1e-5) and np.allclose(m_small, mean, atol=1e-6)
    x = augment(normalise(thumbs)).astype(np.float64)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    assert np.allclose(mean, x.mean(axis=0), atol=1e-5)
    assert np.abs((vt[:16] * comps).sum(axis=1)).min() > 1 - 1e-4  # same directions (signs fixed apart)


def test_pca_hash_separates_near_duplicates_from_distinct_images():
    fam = variants(photo("chelsea"))
    others = [jpeg(photo(n)) for n in ("coffee", "rocket", "camera", "china")] + [generated(s) for s in range(30)]
    thumbs = np.stack([thumbnail(b, 16) for b in [*fam.values(), *others]])
    mean, comps = fit_pca(thumbs, 64)
    codes = pca_hash(thumbs, mean, comps)
    assert codes.shape == (len(thumbs), 8) and codes.dtype == np.uint8
    near = hamming(codes[0], codes[1:len(fam)])
    far = hamming(codes[0], codes[len(fam):])
    assert near.max() < far.min(), (near, far.min())


def test_hamming_counts_differing_bits():
    a = np.array([[0b1010_0000, 0]], np.uint8)
    b = np.array([[0b0110_0000, 1]], np.uint8)
    assert hamming(a, b).tolist() == [3]


def test_phash_matches_imagehash():
    import io

    import imagehash
    from PIL import Image

    data = jpeg(photo("astronaut"))
    h = imagehash.phash(Image.open(io.BytesIO(data)))
    assert np.array_equal(np.unpackbits(phash(data)).astype(bool), h.hash.reshape(-1))
    assert phash(b"junk") is None
