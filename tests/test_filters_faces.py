"""Face detection and blurring: the real Haar cascade on real photos; SCRFD decoding on a fake ONNX model."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage
import sklearn
from PIL import Image

from pipeline.filters.faces import (
    FaceBox,
    FaceDetector,
    blur_boxes,
    blur_faces_in_bytes,
    decode_scrfd,
    distance2bbox,
    expand_box,
    nms,
)
from pipeline.imaging import decode_and_encode

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SKLEARN_IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"
NO_FACE_PHOTOS = {
    "coffee": SKIMAGE_DATA / "coffee.png",
    "chelsea": SKIMAGE_DATA / "chelsea.png",
    "camera": SKIMAGE_DATA / "camera.png",
    "rocket": SKIMAGE_DATA / "rocket.jpg",
    "motorcycle": SKIMAGE_DATA / "motorcycle_left.png",
    "horse": SKIMAGE_DATA / "horse.png",
    "china": SKLEARN_IMAGES / "china.jpg",
    "flower": SKLEARN_IMAGES / "flower.jpg",
}
ASTRONAUT_FACE = (165, 75, 265, 200)  # x0, y0, x1, y1 of the face in the 512×512 image


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _stored(path: Path) -> bytes:
    """The image as ingest stores it (JPEG q90)."""
    result = decode_and_encode(path.read_bytes(), max_pixels=50_000_000, max_side=1024)
    assert result.status == "ok"
    return result.image


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _overlap(box: FaceBox, region: tuple[int, int, int, int]) -> float:
    """Fraction of the box's area inside region."""
    x0, y0, x1, y1 = region
    w = max(0, min(box.x + box.w, x1) - max(box.x, x0))
    h = max(0, min(box.y + box.h, y1) - max(box.y, y0))
    return w * h / (box.w * box.h)


def _high_freq_energy(rgb: np.ndarray) -> float:
    grey = cv2.cvtColor(np.asarray(rgb, np.uint8), cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(grey, cv2.CV_64F).var())


@pytest.fixture(scope="module")
def haar() -> FaceDetector:
    return FaceDetector()


# --- Haar on real photos -------------------------------------------------------------------------

def test_astronaut_face_is_found(haar):
    boxes = haar.detect(_rgb(SKIMAGE_DATA / "astronaut.png"))
    print("\nastronaut:", boxes)
    assert len(boxes) == 1, boxes  # the face, and no false positive elsewhere in the picture
    box = boxes[0]
    assert _overlap(box, ASTRONAUT_FACE) > 0.7
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    assert 165 < cx < 265 and 75 < cy < 200
    assert 0.5 <= box.score <= 1.0


def test_no_false_positives_on_photos_without_faces(haar):
    found = {name: haar.detect(_rgb(path)) for name, path in NO_FACE_PHOTOS.items()}
    print("\nHaar on face-free photos:", {n: len(b) for n, b in found.items()})
    assert all(not boxes for boxes in found.values()), found


def test_score_threshold_and_min_size_filter(haar):
    astronaut = _rgb(SKIMAGE_DATA / "astronaut.png")
    flower = _rgb(SKLEARN_IMAGES / "flower.jpg")
    permissive = FaceDetector(score_threshold=0.0)
    assert len(permissive.detect(flower)) >= 1  # the cascade's raw false positives on the flower ...
    assert haar.detect(flower) == []  # ... are all below the default threshold
    assert FaceDetector(min_size=120).detect(astronaut) == []
    assert FaceDetector(min_size=600).detect(astronaut) == []  # smaller than min_size: nothing to search
    grey = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    assert len(haar.detect(grey)) == 1
    assert haar.model_id == FaceDetector().model_id and haar.model_id.startswith("haar:")


# --- blurring ----------------------------------------------------------------------------------------

def test_blur_boxes_only_changes_the_enlarged_box():
    rgb = _rgb(SKIMAGE_DATA / "astronaut.png")
    box = FaceBox(177, 66, 95, 95, 0.99)
    out = blur_boxes(rgb, [box], margin=0.2)
    big = expand_box(box, 0.2, 512, 512)
    assert (big.x, big.y, big.w, big.h) == (158, 47, 133, 133)
    inside = np.zeros(rgb.shape[:2], bool)
    inside[big.y:big.y + big.h, big.x:big.x + big.w] = True
    assert np.array_equal(out[~inside], rgb[~inside])  # byte-identical outside
    before, after = rgb[inside].astype(int), out[inside].astype(int)
    assert np.abs(before - after).mean() > 10
    crop = (slice(big.y, big.y + big.h), slice(big.x, big.x + big.w))
    assert _high_freq_energy(out[crop]) < 0.05 * _high_freq_energy(rgb[crop])
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    assert np.array_equal(blur_boxes(rgb, []), rgb)


def test_blur_strength_scales_with_face_size():
    rgb = _rgb(SKIMAGE_DATA / "astronaut.png")
    box = FaceBox(177, 66, 95, 95, 0.99)
    crop = (slice(66, 161), slice(177, 272))
    energies = [_high_freq_energy(blur_boxes(rgb, [box], strength=s)[crop]) for s in (0.02, 0.1, 0.25)]
    assert energies[0] > energies[1] > energies[2]


def test_expand_box_margin_and_clipping():
    assert expand_box(FaceBox(100, 50, 40, 20, 0.9), 0.25, 1000, 1000) == FaceBox(90, 45, 60, 30, 0.9)
    assert expand_box(FaceBox(100, 50, 40, 20, 0.9), 0.0, 1000, 1000) == FaceBox(100, 50, 40, 20, 0.9)
    # fractional growth rounds outwards
    assert expand_box(FaceBox(10, 10, 30, 30, 1.0), 0.1, 100, 100) == FaceBox(7, 7, 36, 36, 1.0)
    # clipped at every border
    assert expand_box(FaceBox(5, 3, 40, 40, 1.0), 0.5, 60, 50) == FaceBox(0, 0, 60, 50, 1.0)
    assert expand_box(FaceBox(50, 40, 20, 20, 1.0), 0.2, 64, 48) == FaceBox(46, 36, 18, 12, 1.0)


def test_blur_at_the_image_border_stays_inside_the_image():
    rgb = _rgb(SKIMAGE_DATA / "astronaut.png")
    box = FaceBox(480, 490, 40, 30, 1.0)  # partly outside: clipped
    out = blur_boxes(rgb, [box], margin=0.5)
    assert np.array_equal(out[:470], rgb[:470]) and np.array_equal(out[:, :460], rgb[:, :460])
    assert not np.array_equal(out[475:, 460:], rgb[475:, 460:])


def test_blur_faces_in_bytes_on_the_astronaut(haar):
    data = _stored(SKIMAGE_DATA / "astronaut.png")
    new, boxes, width, height = blur_faces_in_bytes(data, haar, margin=0.2)
    assert (width, height) == (512, 512)
    assert len(boxes) == 1 and new != data
    box = boxes[0]
    detected = haar.detect(_decode(data).astype(np.uint8))[0]
    assert box == expand_box(detected, 0.2, 512, 512)  # boxes are returned enlarged, as blurred
    assert _overlap(box, ASTRONAUT_FACE) > 0.5
    assert new[:2] == b"\xff\xd8"  # JPEG
    before, after = _decode(data), _decode(new)
    crop = (slice(box.y, box.y + box.h), slice(box.x, box.x + box.w))
    assert np.abs(after[crop] - before[crop]).mean() > 10
    assert _high_freq_energy(after[crop]) < 0.1 * _high_freq_energy(before[crop])
    corner = (slice(384, 512), slice(384, 512))  # bottom-right, far from the face
    diff = np.abs(after[corner] - before[corner])
    print(f"\ncorner after JPEG re-encode: mean |diff| {diff.mean():.3f}, max {diff.max()}")
    assert diff.mean() < 1.5 and diff.max() <= 24  # JPEG generation loss only


def test_no_face_returns_the_original_bytes(haar):
    data = _stored(NO_FACE_PHOTOS["coffee"])
    new, boxes, width, height = blur_faces_in_bytes(data, haar, margin=0.2)
    assert hashlib.sha256(new).hexdigest() == hashlib.sha256(data).hexdigest()
    assert boxes == [] and (width, height) == (600, 400)


@pytest.mark.parametrize("bad", [b"", b"not an image", b"\xff\xd8\xff\xe0" + b"\0" * 64])
def test_undecodable_bytes_never_raise(haar, bad):
    assert blur_faces_in_bytes(bad, haar, margin=0.2) == (bad, [], 0, 0)


def test_truncated_image_never_raises(haar):
    data = _stored(SKIMAGE_DATA / "astronaut.png")
    assert blur_faces_in_bytes(data[: len(data) // 3], haar, margin=0.2) == (data[: len(data) // 3], [], 0, 0)


def test_webp_output(haar):
    new, boxes, _, _ = blur_faces_in_bytes(_stored(SKIMAGE_DATA / "astronaut.png"), haar, margin=0.1, fmt="webp")
    assert new[:4] == b"RIFF" and new[8:12] == b"WEBP" and len(boxes) == 1
    with pytest.raises(ValueError):
        blur_faces_in_bytes(new, haar, margin=0.1, fmt="gif")


# --- kind dispatch, missing weights ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["yunet", "scrfd"])
def test_missing_onnx_detector_is_a_clear_error(tmp_path, kind):
    missing = tmp_path / f"{kind}.onnx"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        FaceDetector(kind=kind, model_path=missing)
    with pytest.raises(ValueError, match="model_path"):
        FaceDetector(kind=kind)


def test_unknown_kind_and_bad_cascade(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        FaceDetector(kind="mtcnn")
    bad = tmp_path / "cascade.xml"
    bad.write_text("<opencv_storage></opencv_storage>")
    with pytest.raises(ValueError, match="cascade"):
        FaceDetector(model_path=bad)


# --- SCRFD decoding -----------------------------------------------------------------------------------
# Model input 64×64: strides 8/16/32 give 8×8, 4×4 and 2×2 cells with 2 anchors each.
SIZE = 64
ANCHORS = {8: 128, 16: 32, 32: 8}


def _scrfd_maps() -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(scores [n,1], distances [n,4] in stride units, landmarks [n,10]) per stride."""
    maps = {s: (np.zeros((n, 1), np.float32), np.ones((n, 4), np.float32), np.zeros((n, 10), np.float32))
            for s, n in ANCHORS.items()}
    # stride 16, cell (row 1, col 2) → centre (32, 16); anchor 0 then anchor 1 of that cell
    maps[16][0][12] = 0.9
    maps[16][1][12] = [1.0, 0.5, 1.0, 1.5]  # → (16, 8, 48, 40)
    maps[16][0][13] = 0.8
    maps[16][1][13] = [1.0, 0.5, 1.0, 1.25]  # same face, lower score: suppressed by NMS
    # stride 8, cell (row 4, col 1) → centre (8, 32), anchor 0
    maps[8][0][66] = 0.7
    maps[8][1][66] = [0.5, 0.5, 1.0, 0.5]  # → (4, 28, 16, 36)
    # stride 32, cell (1, 1): below the threshold
    maps[32][0][6] = 0.3
    return maps


def _standard_order(maps) -> list[np.ndarray]:
    return [maps[s][i] for i in range(3) for s in (8, 16, 32)]  # scores 8/16/32, boxes 8/16/32, kps 8/16/32


def test_distance2bbox_and_nms():
    points = np.array([[10.0, 20.0]])
    assert distance2bbox(points, np.array([[1.0, 2.0, 3.0, 4.0]])).tolist() == [[9.0, 18.0, 13.0, 24.0]]
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 10.5]], np.float32)
    scores = np.array([0.5, 0.9, 0.8, 0.4], np.float32)
    assert nms(boxes, scores, 0.4).tolist() == [1, 2]
    assert nms(boxes, scores, 0.99).tolist() == [1, 2, 0, 3]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.4).tolist() == []


def test_decode_scrfd_on_synthetic_outputs():
    maps = _scrfd_maps()
    boxes, scores = decode_scrfd(_standard_order(maps), (SIZE, SIZE), score_threshold=0.5)
    np.testing.assert_allclose(scores, [0.9, 0.7])
    np.testing.assert_allclose(boxes, [[16, 8, 48, 40], [4, 28, 16, 36]])
    # without landmarks (6 outputs), interleaved per stride, and batched [1, n, c] outputs: same result
    no_kps = [maps[s][i] for i in range(2) for s in (8, 16, 32)]
    interleaved = [maps[s][i][None] for s in (32, 8, 16) for i in range(3)]
    for outputs in (no_kps, interleaved):
        b, s = decode_scrfd(outputs, (SIZE, SIZE), score_threshold=0.5)
        np.testing.assert_allclose(b, boxes)
        np.testing.assert_allclose(s, scores)
    # a lower threshold lets the stride-32 anchor in: cell (1, 1) → centre (32, 32), distances 1 × 32
    b, s = decode_scrfd(_standard_order(maps), (SIZE, SIZE), score_threshold=0.25)
    assert len(s) == 3 and [0, 0, 64, 64] in b.tolist()
    with pytest.raises(ValueError, match="SCRFD"):
        decode_scrfd(_standard_order(maps)[:4], (SIZE, SIZE), 0.5)


# A tiny ONNX writer (the `onnx` package is not installed): protobuf wire format by hand.
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes | str) -> bytes:
    if isinstance(value, int):
        return _varint(number << 3) + _varint(value)
    payload = value.encode() if isinstance(value, str) else value
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _value_info(name: str, shape: tuple[int, ...]) -> bytes:
    dims = b"".join(_field(1, _field(1, d)) for d in shape)
    tensor_type = _field(1, 1) + _field(2, dims)  # elem_type FLOAT, shape
    return _field(1, name) + _field(2, _field(1, tensor_type))


def _fake_scrfd_onnx(outputs: list[np.ndarray]) -> bytes:
    """An ONNX model with input [1, 3, SIZE, SIZE] whose outputs are the given constants."""
    graph = _field(2, "fake_scrfd")
    for i, array in enumerate(outputs):
        tensor = b"".join(_field(1, d) for d in array.shape) + _field(2, 1) + _field(8, f"c{i}")
        graph += _field(1, _field(1, f"c{i}") + _field(2, f"out{i}") + _field(3, f"id{i}") + _field(4, "Identity"))
        graph += _field(5, tensor + _field(9, array.astype("<f4").tobytes()))
        graph += _field(12, _value_info(f"out{i}", array.shape))
    graph += _field(11, _value_info("input.1", (1, 3, SIZE, SIZE)))
    opset = _field(1, "") + _field(2, 13)
    return _field(1, 8) + _field(2, "lvd-tests") + _field(7, graph) + _field(8, opset)


def test_scrfd_detector_end_to_end_on_a_fake_model(tmp_path):
    model = tmp_path / "scrfd_fake.onnx"
    model.write_bytes(_fake_scrfd_onnx(_standard_order(_scrfd_maps())))
    detector = FaceDetector(kind="scrfd", model_path=model, min_size=10)
    assert detector.model_id.startswith("scrfd:scrfd_fake.onnx:")
    image = np.full((96, 128, 3), 128, np.uint8)  # letterboxed into 64×64 at scale 0.5
    boxes = detector.detect(image)
    # (16, 8, 48, 40) and (4, 28, 16, 36) in model pixels, ×2 back to the image; NMS dropped the duplicate
    assert [(b.x, b.y, b.w, b.h) for b in boxes] == [(32, 16, 64, 64), (8, 56, 24, 16)]
    assert [b.score for b in boxes] == pytest.approx([0.9, 0.7])
    # min_size and score_threshold filter in original-image pixels
    strict = FaceDetector(kind="scrfd", model_path=model, min_size=24, score_threshold=0.75)
    assert [(b.x, b.y, b.w, b.h) for b in strict.detect(image)] == [(32, 16, 64, 64)]
    new, blurred, w, h = blur_faces_in_bytes(_png(image), detector, margin=0.0)
    assert (w, h) == (128, 96) and len(blurred) == 2


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


def test_fake_onnx_writer_is_valid():
    import onnxruntime as ort

    arrays = [np.arange(6, dtype=np.float32).reshape(3, 2)]
    session = ort.InferenceSession(_fake_scrfd_onnx(arrays), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"input.1": np.zeros((1, 3, SIZE, SIZE), np.float32)})
    np.testing.assert_array_equal(out, arrays[0])
