"""Real photos that ship inside installed packages, and near-duplicate variants of them."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SKIMAGE_DATA = Path(__import__("skimage").__file__).parent / "data"
SKLEARN_IMAGES = Path(__import__("sklearn").__file__).parent / "datasets" / "images"
ROOT = Path(__file__).resolve().parent.parent

PHOTOS = {  # name → file shipped in a package (never downloaded)
    "astronaut": SKIMAGE_DATA / "astronaut.png", "coffee": SKIMAGE_DATA / "coffee.png",
    "chelsea": SKIMAGE_DATA / "chelsea.png", "camera": SKIMAGE_DATA / "camera.png",
    "rocket": SKIMAGE_DATA / "rocket.jpg", "hubble": SKIMAGE_DATA / "hubble_deep_field.jpg",
    "retina": SKIMAGE_DATA / "retina.jpg", "motorcycle": SKIMAGE_DATA / "motorcycle_left.png",
    "coins": SKIMAGE_DATA / "coins.png", "moon": SKIMAGE_DATA / "moon.png", "page": SKIMAGE_DATA / "page.png",
    "brick": SKIMAGE_DATA / "brick.png", "grass": SKIMAGE_DATA / "grass.png", "gravel": SKIMAGE_DATA / "gravel.png",
    "horse": SKIMAGE_DATA / "horse.png", "ihc": SKIMAGE_DATA / "ihc.png", "cell": SKIMAGE_DATA / "cell.png",
    "clock": SKIMAGE_DATA / "clock_motion.png", "china": SKLEARN_IMAGES / "china.jpg",
    "flower": SKLEARN_IMAGES / "flower.jpg",
}


def photo(name: str) -> Image.Image:
    """A shipped photo as an RGB PIL image."""
    with Image.open(PHOTOS[name]) as im:
        return im.convert("RGB")


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def variants(im: Image.Image) -> dict[str, bytes]:
    """The original and near-duplicates: JPEG re-encodes, a resize, a small crop, a brightness shift."""
    w, h = im.size
    dx, dy = int(w * 0.03), int(h * 0.03)
    return {
        "orig": jpeg(im, 95),
        "q30": jpeg(im, 30),
        "q70": jpeg(im, 70),
        "half": jpeg(im.resize((w // 2, h // 2), Image.Resampling.BICUBIC)),
        "crop": jpeg(im.crop((dx, dy, w - dx, h - dy))),
        "bright": jpeg(ImageEnhance.Brightness(im).enhance(1.25)),
    }


def generated(seed: int, size: tuple[int, int] = (160, 120)) -> bytes:
    """A distinct synthetic image (smooth random field plus shapes)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * rng.uniform(2, 12) + rng.uniform(0, 6)) * np.cos(yy * rng.uniform(2, 12))
                     for _ in range(3)], axis=-1)
    arr = ((base + 1) * 127.5).astype(np.uint8)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - 20), rng.integers(0, h - 20)
        arr[y0:y0 + rng.integers(10, 40), x0:x0 + rng.integers(10, 40)] = rng.integers(0, 255, 3)
    return jpeg(Image.fromarray(arr))


def artifacts_dir() -> Path:
    """Where tests save what a person should look at (screenshots, reports): $TEST_ARTIFACTS_DIR or tests/artifacts."""
    out = Path(os.environ.get("TEST_ARTIFACTS_DIR") or ROOT / "tests" / "artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out
