"""Face detection and blurring for the ``face_blur`` stage.

Detectors (``FaceDetector(kind=...)``):

* ``haar`` (default): OpenCV's bundled ``haarcascade_frontalface_default.xml``, on the grey image.
  ``FaceBox.score`` is a monotone squash of the cascade's final-stage margin (OpenCV's
  ``levelWeights``), ``1 / (1 + exp(-(weight - 1)))`` — not a probability, but it lets the one
  ``score_threshold`` knob work for every kind: 0.5 ⇔ margin 1. Measured margins: the
  scikit-image astronaut's face 5.8, 98/100 LFW faces ≥ 1.6 (one at 0.8), false positives
  on sklearn's flower photo 0.6 / 0.8 / −0.4 (dropped).
* ``yunet``: a YuNet ONNX (e.g. ``face_detection_yunet_2023mar.onnx``) through
  ``cv2.FaceDetectorYN``; score is YuNet's face confidence.
* ``scrfd``: an InsightFace SCRFD ONNX (e.g. ``det_10g.onnx``, ``scrfd_2.5g_bnkps.onnx``) on
  onnxruntime with the standard decoding: letterbox into the model input (640×640 if the input
  is dynamic), (RGB − 127.5) / 128, per-stride score/distance maps (strides 8/16/32 with 2
  anchors, or 8..128 with 1), ``distance2bbox``, score threshold, NMS at IoU 0.4.

Blurring follows the ImageNet face-obfuscation work (Yang et al., 2021): each box is enlarged by
a margin and blurred with a Gaussian whose sigma is proportional to the face size: 0.1 × the
longer side of the face, their value and our default (``strength``), which leaves a face-coloured
blob with no recognisable features. Unlike their feathered mask, the blur is written only inside
the enlarged boxes, so every other pixel stays byte-identical.
"""
from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pipeline.digest import sha256_file

from pipeline.imaging import ALLOWED_FORMATS, encode, exif_transpose, to_rgb

__all__ = [
    "DEFAULT_BLUR_STRENGTH",
    "DETECTOR_KINDS",
    "FaceBox",
    "FaceDetector",
    "blur_boxes",
    "blur_faces_in_bytes",
    "decode_scrfd",
    "distance2bbox",
    "expand_box",
    "nms",
]

DETECTOR_KINDS: tuple[str, ...] = ("haar", "yunet", "scrfd")
HAAR_CASCADE = "haarcascade_frontalface_default.xml"
HAAR_MARGIN_AT_HALF = 1.0  # cascade margin that maps to score 0.5
DEFAULT_BLUR_STRENGTH = 0.1  # sigma = strength × longer side of the detected face (ImageNet obfuscation)
YUNET_NMS_IOU = 0.3  # OpenCV's default for FaceDetectorYN
SCRFD_NMS_IOU = 0.4  # InsightFace's default
SCRFD_DEFAULT_INPUT = (640, 640)  # (width, height) when the model's input is dynamic
_ENCODE_FORMATS = ("jpeg", "webp")


@dataclass
class FaceBox:
    """A face in pixel coordinates of the image it was found in: top-left (x, y), size (w, h)."""

    x: int
    y: int
    w: int
    h: int
    score: float


def _box_from_corners(x1: float, y1: float, x2: float, y2: float, width: int, height: int) -> tuple[int, int, int, int]:
    """Float corners → integer (x, y, w, h) covering them, clipped to the image."""
    left, top = max(0, math.floor(x1)), max(0, math.floor(y1))
    right, bottom = min(width, math.ceil(x2)), min(height, math.ceil(y2))
    return left, top, max(0, right - left), max(0, bottom - top)


# --- SCRFD decoding (pure numpy, testable without weights) ---------------------------------------

def distance2bbox(points: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """Anchor centres ``[N, 2]`` and (left, top, right, bottom) distances ``[N, 4]`` → x1y1x2y2 ``[N, 4]``."""
    return np.stack(
        [points[:, 0] - distance[:, 0], points[:, 1] - distance[:, 1],
         points[:, 0] + distance[:, 2], points[:, 1] + distance[:, 3]],
        axis=-1,
    )


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Greedy non-maximum suppression on x1y1x2y2 boxes; indices kept, best score first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
    areas = np.maximum(0.0, x2 - x1) * np.maximum(0.0, y2 - y1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = (np.maximum(0.0, np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]))
                 * np.maximum(0.0, np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest])))
        iou = inter / np.maximum(areas[best] + areas[rest] - inter, 1e-12)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def _scrfd_layout(n_outputs: int) -> tuple[tuple[int, ...], int]:
    if n_outputs in (6, 9):
        return (8, 16, 32), 2
    if n_outputs in (10, 15):
        return (8, 16, 32, 64, 128), 1
    raise ValueError(f"not an SCRFD model: {n_outputs} outputs (expected 6, 9, 10 or 15)")


def _group_scrfd_outputs(outputs: list[np.ndarray], n_strides: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Split raw outputs into per-stride (scores, distances), finest stride first.

    Outputs are grouped by their last dimension (1 = score, 4 = box, 10 = landmarks) and, within
    a group, ordered by anchor count, so exports that interleave them decode the same way.
    """
    flat = [o[0] if o.ndim == 3 else o for o in outputs]
    groups: dict[int, list[np.ndarray]] = {}
    for out in flat:
        groups.setdefault(out.shape[-1], []).append(out)
    scores, boxes = groups.get(1, []), groups.get(4, [])
    if len(scores) != n_strides or len(boxes) != n_strides:
        raise ValueError(f"SCRFD outputs: expected {n_strides} score and box maps, got shapes {[o.shape for o in flat]}")
    by_size = lambda arrays: sorted(arrays, key=lambda a: -a.shape[0])  # noqa: E731
    return by_size(scores), by_size(boxes)


def decode_scrfd(
    outputs: list[np.ndarray], input_size: tuple[int, int], score_threshold: float, nms_threshold: float = SCRFD_NMS_IOU
) -> tuple[np.ndarray, np.ndarray]:
    """Raw SCRFD outputs → (x1y1x2y2 boxes ``[K, 4]`` in model-input pixels, scores ``[K]``) after NMS.

    ``input_size`` is the model input (width, height). Box distances are in stride units.
    """
    strides, n_anchors = _scrfd_layout(len(outputs))
    score_maps, box_maps = _group_scrfd_outputs(outputs, len(strides))
    width, height = input_size
    all_boxes, all_scores = [], []
    for stride, score_map, box_map in zip(strides, score_maps, box_maps):
        rows, cols = height // stride, width // stride
        if score_map.shape[0] != rows * cols * n_anchors:
            raise ValueError(f"stride {stride}: {score_map.shape[0]} anchors, expected {rows}×{cols}×{n_anchors}")
        centres = np.stack(np.mgrid[:rows, :cols][::-1], axis=-1).reshape(-1, 2).astype(np.float32) * stride
        centres = np.repeat(centres, n_anchors, axis=0)  # anchor-major within each cell, as exported
        scores = score_map.reshape(-1)
        keep = scores >= score_threshold
        all_boxes.append(distance2bbox(centres[keep], box_map[keep] * stride))
        all_scores.append(scores[keep])
    boxes, scores = np.concatenate(all_boxes), np.concatenate(all_scores)
    kept = nms(boxes, scores, nms_threshold)
    return boxes[kept], scores[kept]


# --- detector ----------------------------------------------------------------------------------

class FaceDetector:
    """Haar cascade by default (``cv2.data.haarcascades`` + 'haarcascade_frontalface_default.xml');
    YuNet ONNX via ``cv2.FaceDetectorYN`` when ``model_path`` is given and ``kind='yunet'``; SCRFD
    ONNX via onnxruntime when ``kind='scrfd'``.

    ``min_size`` (pixels) drops smaller faces for every kind; ``score_threshold`` applies to
    ``FaceBox.score`` (module docstring for what it means per kind); ``scale_factor`` and
    ``min_neighbors`` are the Haar cascade's ``detectMultiScale`` parameters.
    """

    def __init__(
        self,
        kind: str = "haar",
        model_path: str | os.PathLike[str] | None = None,
        min_size: int = 24,
        score_threshold: float = 0.5,
        scale_factor: float = 1.1,
        min_neighbors: int = 5,
    ):
        if kind not in DETECTOR_KINDS:
            raise ValueError(f"face detector kind must be one of {DETECTOR_KINDS}, not {kind!r}")
        self.kind = kind
        self.min_size = int(min_size)
        self.score_threshold = float(score_threshold)
        self.scale_factor = float(scale_factor)
        self.min_neighbors = int(min_neighbors)
        if kind == "haar":
            path = Path(model_path) if model_path is not None else Path(cv2.data.haarcascades) / HAAR_CASCADE
        else:
            if model_path is None:
                raise ValueError(f"face detector kind {kind!r} needs model_path (an ONNX file)")
            path = Path(model_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{kind} face detector model not found at {path}: download the ONNX weights there, "
                "fix face_blur.model_path, or use kind 'haar' (bundled with OpenCV)"
            )
        self.model_path = path
        digest = sha256_file(path)[:16]
        self.model_id = f"{kind}:{path.name}:{digest}@opencv-{cv2.__version__}"
        getattr(self, f"_load_{kind}")(path)

    # loaders
    def _load_haar(self, path: Path) -> None:
        try:
            self._cascade = cv2.CascadeClassifier(str(path))
        except (cv2.error, SystemError) as exc:
            raise ValueError(f"{path} is not a valid OpenCV cascade file: {exc}") from exc
        if self._cascade.empty():
            raise ValueError(f"{path} is not a valid OpenCV cascade file")

    def _load_yunet(self, path: Path) -> None:
        self._yunet = cv2.FaceDetectorYN.create(str(path), "", (320, 320), self.score_threshold, YUNET_NMS_IOU, 5000)

    def _load_scrfd(self, path: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model_input = self._session.get_inputs()[0]
        self._scrfd_input = model_input.name
        _, _, h, w = model_input.shape
        fixed = isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0
        self._scrfd_size = (w, h) if fixed else SCRFD_DEFAULT_INPUT
        _scrfd_layout(len(self._session.get_outputs()))  # fail early on a non-SCRFD model

    # detection
    def detect(self, rgb: np.ndarray) -> list[FaceBox]:
        """Faces in an RGB (or grey) uint8 image, best score first."""
        if rgb.ndim == 3 and rgb.shape[2] == 4:
            rgb = rgb[:, :, :3]
        if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
            raise ValueError(f"expected an HxW or HxWx3 image, got shape {rgb.shape}")
        if min(rgb.shape[:2]) < self.min_size:
            return []
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        boxes = getattr(self, f"_detect_{self.kind}")(rgb)
        boxes = [b for b in boxes if b.score >= self.score_threshold and min(b.w, b.h) >= self.min_size]
        return sorted(boxes, key=lambda b: (-b.score, b.y, b.x))

    def _detect_haar(self, rgb: np.ndarray) -> list[FaceBox]:
        grey = rgb if rgb.ndim == 2 else cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        rects, _, weights = self._cascade.detectMultiScale3(
            grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
            minSize=(self.min_size, self.min_size), outputRejectLevels=True,
        )
        return [
            FaceBox(int(x), int(y), int(w), int(h), 1.0 / (1.0 + math.exp(-(float(wt) - HAAR_MARGIN_AT_HALF))))
            for (x, y, w, h), wt in zip(rects, np.ravel(weights))
        ]

    def _detect_yunet(self, rgb: np.ndarray) -> list[FaceBox]:
        bgr = cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR if rgb.ndim == 2 else cv2.COLOR_RGB2BGR)
        height, width = bgr.shape[:2]
        self._yunet.setInputSize((width, height))
        _, faces = self._yunet.detect(bgr)
        if faces is None:
            return []
        return [
            FaceBox(*_box_from_corners(f[0], f[1], f[0] + f[2], f[1] + f[3], width, height), score=float(f[14]))
            for f in faces
        ]

    def _detect_scrfd(self, rgb: np.ndarray) -> list[FaceBox]:
        if rgb.ndim == 2:
            rgb = cv2.cvtColor(rgb, cv2.COLOR_GRAY2RGB)
        height, width = rgb.shape[:2]
        in_w, in_h = self._scrfd_size
        scale = min(in_w / width, in_h / height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = np.zeros((in_h, in_w, 3), dtype=np.float32)
        canvas[:new_h, :new_w] = cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        blob = ((canvas - 127.5) / 128.0).transpose(2, 0, 1)[None]
        outputs = self._session.run(None, {self._scrfd_input: blob})
        boxes, scores = decode_scrfd(outputs, (in_w, in_h), self.score_threshold)
        return [
            FaceBox(*_box_from_corners(*(box / scale), width, height), score=float(s))
            for box, s in zip(boxes, scores)
        ]


# --- blurring ----------------------------------------------------------------------------------

def expand_box(box: FaceBox, margin: float, width: int, height: int) -> FaceBox:
    """``box`` grown by ``margin`` × its width (height) on the left and right (top and bottom),
    rounded outwards and clipped to a ``width`` × ``height`` image; the score is kept."""
    dx, dy = margin * box.w, margin * box.h
    return FaceBox(*_box_from_corners(box.x - dx, box.y - dy, box.x + box.w + dx, box.y + box.h + dy, width, height),
                   score=box.score)


def blur_boxes(
    rgb: np.ndarray, boxes: list[FaceBox], margin: float = 0.2, strength: float = DEFAULT_BLUR_STRENGTH
) -> np.ndarray:
    """A copy of ``rgb`` with each box (enlarged by ``margin``, clipped) Gaussian-blurred in place.

    Sigma = ``strength`` × the longer side of the box as detected (before the margin); the blur
    reads the surrounding pixels (reflected at the image border) but writes only inside the
    enlarged box, so every pixel outside the boxes is byte-identical to the input.
    """
    out = np.array(rgb, copy=True)
    height, width = out.shape[:2]
    for box in boxes:
        big = expand_box(box, margin, width, height)
        if big.w == 0 or big.h == 0:
            continue
        sigma = max(1.0, strength * max(box.w, box.h))
        pad = math.ceil(3 * sigma)
        x0, y0 = max(0, big.x - pad), max(0, big.y - pad)
        x1, y1 = min(width, big.x + big.w + pad), min(height, big.y + big.h + pad)
        region = cv2.GaussianBlur(out[y0:y1, x0:x1], (0, 0), sigmaX=sigma, sigmaY=sigma,
                                  borderType=cv2.BORDER_REFLECT_101)
        out[big.y:big.y + big.h, big.x:big.x + big.w] = region[big.y - y0:big.y - y0 + big.h,
                                                                big.x - x0:big.x - x0 + big.w]
    return out


def _decode_rgb(data: bytes) -> np.ndarray | None:
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            im.load()
            return np.asarray(to_rgb(exif_transpose(im)))
    except Exception:  # noqa: BLE001 - undecodable bytes are reported, not raised
        return None


def blur_faces_in_bytes(
    data: bytes, detector: FaceDetector, *, margin: float, fmt: str = "jpeg", quality: int = 90
) -> tuple[bytes, list[FaceBox], int, int]:
    """Detect and blur the faces of one encoded image.

    Returns (bytes, boxes, width, height): the re-encoded image (``fmt``/``quality``, encoded as
    ``pipeline.imaging`` does) and the boxes as blurred (enlarged by ``margin``, clipped); the
    ORIGINAL bytes, unchanged, when no face is found. Undecodable bytes give (data, [], 0, 0).
    """
    if fmt not in _ENCODE_FORMATS:
        raise ValueError(f"fmt must be one of {list(_ENCODE_FORMATS)}, not {fmt!r}")
    rgb = _decode_rgb(data) if data else None
    if rgb is None:
        return data, [], 0, 0
    height, width = rgb.shape[:2]
    faces = detector.detect(rgb)
    if not faces:
        return data, [], width, height
    blurred = blur_boxes(rgb, faces, margin=margin)
    boxes = [expand_box(face, margin, width, height) for face in faces]
    return encode(Image.fromarray(blurred, "RGB"), fmt, quality), boxes, width, height
