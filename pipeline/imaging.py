"""Validate, decode and re-encode one image: bomb guard from the header, full decode, EXIF
orientation, RGB (alpha on white), optional downscale, deterministic JPEG/WebP output.

``decode_and_encode`` is a plain top-level function (picklable for worker processes) and never
raises for bad input; its ``status`` is one of ``DECODE_STATUS_CLASSES``.
"""
from __future__ import annotations

from pipeline.digest import sha256_bytes
import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["ALLOWED_FORMATS", "DECODE_STATUS_CLASSES", "DecodedImage", "decode_and_encode"]

DECODE_STATUS_CLASSES: tuple[str, ...] = ("ok", "not_an_image", "decode_error", "decompression_bomb")
# Formats found on the web. Lenient-magic formats (e.g. TGA) are left out so text is never "an image".
ALLOWED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "WEBP", "AVIF", "BMP", "TIFF", "ICO", "JPEG2000")
_ENCODERS = {"jpeg": "JPEG", "webp": "WEBP"}
_HIGH_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


@dataclass
class DecodedImage:
    """The stored form of one image, or why there is none."""

    status: str
    error: str | None
    image: bytes | None
    width: int | None
    height: int | None
    sha256: str | None


def _fail(status: str, error: str) -> DecodedImage:
    return DecodedImage(status, error, None, None, None, None)


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit integer or float greyscale → 8-bit "L" (scaled if values exceed 255)."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64))
    hi = float(arr.max()) if arr.size else 0.0
    if hi > 255:
        arr = arr * (255.0 / (65535.0 if hi <= 65535 else hi))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is composited onto white."""
    if im.mode in _HIGH_BIT_MODES:
        im = _to_8bit(im)
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _target_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    if not max_side or max(width, height) <= max_side:
        return width, height
    scale = max_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def exif_transpose(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - corrupt EXIF: keep the pixels as stored
        return im


def encode(im: Image.Image, fmt: str, quality: int) -> bytes:
    im.info = {}  # no EXIF, ICC or comments carried into the output
    buf = io.BytesIO()
    if fmt == "jpeg":
        im.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    else:
        im.save(buf, "WEBP", quality=quality, method=4)
    return buf.getvalue()


def _process(im: Image.Image, max_pixels: int, max_side: int | None, fmt: str, quality: int) -> DecodedImage:
    width, height = im.size
    if width <= 0 or height <= 0:
        return _fail("decode_error", f"invalid size {width}x{height}")
    if width * height > max_pixels:
        return _fail("decompression_bomb", f"{width}x{height} = {width * height} pixels > max_pixels={max_pixels}")
    if im.format == "JPEG" and max_side and max(width, height) >= 2 * max_side:
        scale = max_side / max(width, height)
        im.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))  # DCT-domain downscale
    im.load()  # full decode; truncated data raises here
    out = to_rgb(exif_transpose(im))
    size = _target_size(*out.size, max_side)
    if size != out.size:
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    data = encode(out, fmt, quality)
    return DecodedImage("ok", None, data, out.width, out.height, sha256_bytes(data))


def decode_and_encode(
    body: bytes, *, max_pixels: int, max_side: int | None, fmt: str = "jpeg", quality: int = 90
) -> DecodedImage:
    """Decode ``body`` fully and re-encode it; every bad input gives a non-'ok' status, never an exception.

    The effective pixel limit is ``min(max_pixels, PIL.Image.MAX_IMAGE_PIXELS)``: PIL's own
    bomb warning is turned into an error locally and reported as ``decompression_bomb``.
    """
    if fmt not in _ENCODERS:
        raise ValueError(f"fmt must be one of {sorted(_ENCODERS)}, not {fmt!r}")
    if not body:
        return _fail("not_an_image", "empty body")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(body), formats=ALLOWED_FORMATS)
        except _BOMB_ERRORS as exc:
            return _fail("decompression_bomb", str(exc))
        except UnidentifiedImageError:
            return _fail("not_an_image", f"not a recognised image (starts with {body[:16]!r})")
        except Exception as exc:  # noqa: BLE001 - a recognised but broken header
            return _fail("decode_error", f"{type(exc).__name__}: {exc}")
        try:
            with im:
                return _process(im, max_pixels, max_side, fmt, quality)
        except _BOMB_ERRORS as exc:
            return _fail("decompression_bomb", str(exc))
        except Exception as exc:  # noqa: BLE001 - truncated/corrupt data, unsupported mode, ...
            return _fail("decode_error", f"{type(exc).__name__}: {exc}")
