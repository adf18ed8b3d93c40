"""Perceptual hashes of encoded images: the DINOv2 paper's PCA hash, and imagehash's pHash.

PCA hash: a grayscale ``size``×``size`` thumbnail, normalised to zero mean and unit variance
(so brightness and contrast shifts do not move it), centred by the mean of a fitted sample and
projected on the top principal components; one bit per component (its sign). The PCA is fitted
on the sample plus shifted and mirrored copies of it: the projection then favours structure that
survives small crops and shifts, and small corpora still give enough samples per component.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def thumbnail(data: bytes, size: int = 32) -> np.ndarray | None:
    """Grayscale ``size``×``size`` thumbnail as uint8 [size*size], or None if undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (size * 2, size * 2))  # JPEG: decode at reduced scale, much faster
            gray = im.convert("L").resize((size, size), Image.Resampling.BOX)
            return np.asarray(gray, dtype=np.uint8).reshape(-1)
    except Exception:  # noqa: BLE001 - an unreadable image simply has no hash
        return None


SHIFTS = ((1, 0), (-1, 0), (0, 1), (0, -1), (2, 2), (-2, -2))
PCA_CHUNK = 1024  # thumbnails augmented at a time by fit_pca: 8 x 1024 x d float64 (16 MiB at 16 x 16)


def normalise(thumbs: np.ndarray) -> np.ndarray:
    """Each thumbnail row to zero mean and unit variance (float32)."""
    x = thumbs.astype(np.float32)
    x -= x.mean(axis=1, keepdims=True)
    x /= x.std(axis=1, keepdims=True) + 1e-6
    return x


def augment(thumbs: np.ndarray) -> np.ndarray:
    """The thumbnails plus shifted (±1–2 px) and mirrored copies, for fitting the PCA."""
    side = int(round(np.sqrt(thumbs.shape[1])))
    imgs = thumbs.reshape(-1, side, side)
    out = [imgs, imgs[:, :, ::-1]] + [np.roll(imgs, (dy, dx), axis=(1, 2)) for dx, dy in SHIFTS]
    return np.concatenate(out).reshape(-1, side * side)


def fit_pca(samples: np.ndarray, bits: int, chunk: int = PCA_CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Mean [d] and top-``bits`` principal directions [bits, d] of thumbnails [n, d] (uint8).

    Fitted on the normalised, augmented sample. Streams: the sample is augmented ``chunk`` thumbnails at a
    time into a float64 sum and scatter matrix [d, d], whose eigenvectors are the principal directions, so
    memory is O(chunk·d + d²) whatever the sample size (a dense SVD of the augmented sample took ~80 KB per
    sampled image). Deterministic: each component's sign is fixed so its largest absolute coordinate is positive.
    """
    d = samples.shape[1]
    n = samples.shape[0] * (2 + len(SHIFTS))
    if samples.shape[0] < 2:
        raise ValueError("the PCA hash needs at least 2 images to fit on")
    total = np.zeros(d)
    scatter = np.zeros((d, d))
    for start in range(0, samples.shape[0], chunk):
        x = augment(normalise(samples[start:start + chunk])).astype(np.float64)
        total += x.sum(axis=0)
        scatter += x.T @ x
    mean = total / n
    cov = scatter / n - np.outer(mean, mean)
    values, vectors = np.linalg.eigh((cov + cov.T) / 2)
    order = np.argsort(-values, kind="stable")[: min(bits, n, d)]
    comps = vectors[:, order].T
    if comps.shape[0] < bits:  # fewer samples than bits: pad with orthogonal basis vectors
        extra = np.eye(d)[: bits - comps.shape[0]]
        comps = np.vstack([comps, extra])
    signs = np.sign(comps[np.arange(bits), np.abs(comps).argmax(axis=1)])
    return mean.astype(np.float32), (comps * signs[:, None]).astype(np.float32)


def pca_hash(thumbs: np.ndarray, mean: np.ndarray, comps: np.ndarray) -> np.ndarray:
    """Packed sign bits [n, bits/8] (uint8) of the centred thumbnails' projections."""
    proj = (normalise(thumbs) - mean) @ comps.T
    return np.packbits(proj > 0, axis=1)


def phash(data: bytes) -> np.ndarray | None:
    """imagehash's 64-bit pHash as 8 packed bytes, or None if undecodable."""
    import imagehash

    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.packbits(imagehash.phash(im).hash.reshape(-1))
    except Exception:  # noqa: BLE001
        return None


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distances between rows of packed codes (broadcasting)."""
    return np.unpackbits(np.bitwise_xor(a, b), axis=-1).sum(axis=-1)


def thumbnails_batch(table, size: int, wanted: frozenset[str]):
    """Ray Data batch fn: (image_id, thumb) for the rows whose id is wanted (the PCA sample)."""
    import pyarrow as pa

    rows, thumbs = [], []
    for row, (image_id, data) in enumerate(zip(table["image_id"].to_pylist(), table["image"].to_pylist())):
        if image_id in wanted:
            t = thumbnail(data, size)
            if t is not None:
                rows.append(row)
                thumbs.append(t.tobytes())
    return pa.table({"image_id": table["image_id"].take(rows), "thumb": pa.array(thumbs, pa.binary()),
                     "_shard": table["_shard"].take(rows)})


def codes_batch(table, method: str, size: int, mean: np.ndarray | None, comps: np.ndarray | None):
    """Ray Data batch fn: (image_id, code) for every row; code is null when the image cannot be hashed."""
    import pyarrow as pa

    ids = table["image_id"].to_pylist()
    blobs = table["image"].to_pylist()
    if method == "phash":
        codes = [phash(b) for b in blobs]
    else:
        thumbs = [thumbnail(b, size) for b in blobs]
        ok = [i for i, t in enumerate(thumbs) if t is not None]
        packed = pca_hash(np.stack([thumbs[i] for i in ok]), mean, comps) if ok else []
        codes = [None] * len(ids)
        for k, i in enumerate(ok):
            codes[i] = packed[k]
    return pa.table({"image_id": pa.array(ids, pa.string()),
                     "code": pa.array([None if c is None else c.tobytes() for c in codes], pa.binary()),
                     "_shard": table["_shard"]})
