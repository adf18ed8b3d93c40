"""decode_and_encode on real and hostile inputs."""
from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, JpegImagePlugin
from skimage import data as skdata

from pipeline.imaging import DECODE_STATUS_CLASSES, DecodedImage, decode_and_encode

MAX_PIXELS = 89_478_485


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def decode(body: bytes, **kw: object) -> DecodedImage:
    args: dict[str, object] = {"max_pixels": MAX_PIXELS, "max_side": None}
    args.update(kw)
    return decode_and_encode(body, **args)  # type: ignore[arg-type]


def stored(res: DecodedImage) -> Image.Image:
    assert res.image is not None
    im = Image.open(io.BytesIO(res.image))
    im.load()
    return im


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (1-bit greyscale), with almost no pixel data."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    return encode(Image.fromarray(skdata.astronaut()), "JPEG", quality=95)


def test_status_classes() -> None:
    assert DECODE_STATUS_CLASSES[0] == "ok"
    assert {"not_an_image", "decode_error", "decompression_bomb"} <= set(DECODE_STATUS_CLASSES)


def test_photo_resized_to_max_side(astronaut_jpeg: bytes) -> None:
    res = decode(astronaut_jpeg, max_side=200)
    assert (res.status, res.error, res.width, res.height) == ("ok", None, 200, 200)
    im = stored(res)
    assert im.format == "JPEG" and im.mode == "RGB" and im.size == (200, 200)
    assert res.sha256 == hashlib.sha256(res.image or b"").hexdigest()
    # real pixels survived: compare with a straightforward downscale of the original
    ref = np.asarray(Image.fromarray(skdata.astronaut()).resize((200, 200), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(im, dtype=float) - ref).mean() < 6


def test_non_square_resize_and_no_upscale() -> None:
    rng = np.random.default_rng(0)
    body = encode(Image.fromarray(rng.integers(0, 255, (300, 1000, 3), dtype=np.uint8)), "PNG")
    res = decode(body, max_side=500)
    assert (res.status, res.width, res.height) == ("ok", 500, 150)
    small = decode(body, max_side=4000)
    assert (small.width, small.height) == (1000, 300)


def test_large_jpeg_uses_draft_and_keeps_size(monkeypatch: pytest.MonkeyPatch) -> None:
    big = Image.fromarray(np.kron(skdata.astronaut(), np.ones((6, 8, 1), dtype=np.uint8)))  # 4096 wide, 3072 high
    calls: list[tuple[object, ...]] = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> object:
        calls.append((mode, size))
        return real_draft(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    res = decode(encode(big, "JPEG", quality=90), max_side=512)
    assert (res.status, res.width, res.height) == ("ok", 512, 384)
    assert calls == [("RGB", (512, 384))]
    ref = np.asarray(Image.fromarray(skdata.astronaut()).resize((512, 384), Image.Resampling.LANCZOS), dtype=float)
    assert np.abs(np.asarray(stored(res), dtype=float) - ref).mean() < 8


def test_webp_output(astronaut_jpeg: bytes) -> None:
    res = decode(astronaut_jpeg, max_side=128, fmt="webp", quality=80)
    assert res.status == "ok" and stored(res).format == "WEBP" and (res.width, res.height) == (128, 128)


def test_header_bomb_rejected_before_decode() -> None:
    body = png_header_only(20000, 20000)
    assert len(body) < 200
    res = decode(body, max_pixels=1_000_000)
    assert res.status == "decompression_bomb" and res.image is None
    # PIL's own guard (400M > 2 x PIL's default limit) also maps to decompression_bomb
    assert decode(body, max_pixels=10**10).status == "decompression_bomb"


def test_real_bomb_png_made_with_pil() -> None:
    body = encode(Image.new("1", (4000, 4000)), "PNG")  # 16M pixels in a few KB
    assert len(body) < 50_000
    res = decode(body, max_pixels=1_000_000)
    assert res.status == "decompression_bomb" and "4000x4000" in (res.error or "")
    assert decode(body, max_pixels=20_000_000, max_side=64).status == "ok"


def test_pil_global_limit_unchanged() -> None:
    before = Image.MAX_IMAGE_PIXELS
    decode(png_header_only(20000, 20000), max_pixels=10**10)
    assert Image.MAX_IMAGE_PIXELS == before


def test_truncated_jpeg(astronaut_jpeg: bytes) -> None:
    res = decode(astronaut_jpeg[: len(astronaut_jpeg) // 2])
    assert res.status == "decode_error" and res.image is None and "truncated" in (res.error or "")


def test_truncated_png() -> None:
    body = encode(Image.fromarray(skdata.astronaut()), "PNG")
    assert decode(body[: len(body) // 3]).status == "decode_error"


@pytest.mark.parametrize(
    "body",
    [b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>",
     b'{"error": "not found"}', b"", b"\x00" * 100, b"GIF89a"],
)
def test_not_an_image(body: bytes) -> None:
    res = decode(body)
    assert res.status in ("not_an_image", "decode_error") and res.image is None
    if body.startswith((b"<", b"{", b"\x00")) or not body:
        assert res.status == "not_an_image"


def test_rgba_png_composited_on_white() -> None:
    arr = np.zeros((40, 40, 4), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0, 255)  # opaque red left half, fully transparent right half
    res = decode(encode(Image.fromarray(arr, "RGBA"), "PNG"))
    im = stored(res)
    assert res.status == "ok" and im.mode == "RGB" and im.format == "JPEG"
    px = np.asarray(im, dtype=int)
    assert np.abs(px[20, 5] - (255, 0, 0)).max() < 20
    assert np.abs(px[20, 35] - (255, 255, 255)).max() < 10


@pytest.mark.parametrize("mode", ["P", "L", "1", "CMYK", "LA", "I;16", "PA"])
def test_other_modes_become_rgb(mode: str) -> None:
    base = Image.fromarray(skdata.astronaut()).resize((64, 64))
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
        assert im.mode.startswith("I")
    elif mode == "PA":
        im = base.convert("P").convert("PA")
    else:
        im = base.convert(mode)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "PA" else "PNG")
    res = decode(encode(im, fmt))
    assert res.status == "ok", res.error
    out = stored(res)
    assert out.mode == "RGB" and out.size == (64, 64)
    if mode == "I;16":  # 16-bit scaled down, not clipped to white
        grey = np.asarray(base.convert("L"), dtype=float)
        assert np.abs(np.asarray(out.convert("L"), dtype=float) - grey).mean() < 6


def test_exif_orientation_applied() -> None:
    arr = np.zeros((100, 200, 3), dtype=np.uint8)
    arr[:, :100] = (255, 0, 0)  # left half red
    arr[:, 100:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    body = encode(Image.fromarray(arr), "JPEG", quality=95, exif=exif.tobytes())
    res = decode(body)
    out = stored(res)
    assert (res.width, res.height) == (100, 200)
    px = np.asarray(out, dtype=int)
    assert px[20, 50, 0] > 200 and px[20, 50, 2] < 60  # top is the former left (red)
    assert px[180, 50, 2] > 200 and px[180, 50, 0] < 60  # bottom is the former right (blue)
    assert 0x0112 not in out.getexif() and "exif" not in out.info


def test_deterministic(astronaut_jpeg: bytes) -> None:
    a = decode(astronaut_jpeg, max_side=300)
    b = decode(bytes(astronaut_jpeg), max_side=300)
    assert a.sha256 == b.sha256 and a.image == b.image
    w1 = decode(astronaut_jpeg, max_side=300, fmt="webp")
    w2 = decode(astronaut_jpeg, max_side=300, fmt="webp")
    assert w1.sha256 == w2.sha256


def test_picklable_for_workers() -> None:
    assert pickle.loads(pickle.dumps(decode_and_encode)) is decode_and_encode
