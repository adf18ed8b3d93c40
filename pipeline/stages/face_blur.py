"""`face_blur`: detect faces in every uncurated image and blur them in the stored bytes."""
from __future__ import annotations

import pyarrow as pa

from pipeline.digest import sha256_bytes
from pipeline.engine import StageContext, register
from pipeline.stages.perimage import PerImageStage
from pipeline.tables import BLURRED_IMAGES_SCHEMA, IMAGES_SCHEMA


class FaceBlurBatch:
    """Ray Data actor: one detector per actor; blurred bytes, face count and boxes per image."""

    def __init__(self, detector: str, model: str | None, margin: float, min_size: int, score_threshold: float,
                 encode_format: str, encode_quality: int):
        import cv2

        from pipeline.filters.faces import FaceDetector

        cv2.setNumThreads(1)  # the actor reserves one CPU; OpenCV would otherwise use every core
        self.detector = FaceDetector(detector, model, min_size=min_size, score_threshold=score_threshold)
        self.margin, self.fmt, self.quality = margin, encode_format, encode_quality

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline.filters.faces import blur_faces_in_bytes

        images, faces, boxes, sha, width, height = [], [], [], [], [], []
        for data, w0, h0, s0 in zip(batch["image"].to_pylist(), batch["width"].to_pylist(),
                                    batch["height"].to_pylist(), batch["sha256"].to_pylist()):
            out, found, w, h = blur_faces_in_bytes(data, self.detector, margin=self.margin, fmt=self.fmt,
                                                   quality=self.quality)
            images.append(out)
            faces.append(len(found))
            boxes.append([[b.x, b.y, b.w, b.h] for b in found])
            sha.append(s0 if out is data or out == data else sha256_bytes(out))
            width.append(w or w0)
            height.append(h or h0)
        out = batch.drop_columns(["image", "sha256", "width", "height"])
        return out.append_column("image", pa.array(images, pa.binary())) \
            .append_column("sha256", pa.array(sha, pa.string())) \
            .append_column("width", pa.array(width, pa.int32())) \
            .append_column("height", pa.array(height, pa.int32())) \
            .append_column("faces", pa.array(faces, pa.int32())) \
            .append_column("face_boxes", pa.array(boxes, BLURRED_IMAGES_SCHEMA.field("face_boxes").type))


@register
class FaceBlur(PerImageStage):
    name = "face_blur"
    version = 1
    upstream = ("ingest",)
    section = "face_blur"
    schema = BLURRED_IMAGES_SCHEMA
    output = "images"
    count_by = ("faces",)
    batch_class = FaceBlurBatch
    input_columns = list(IMAGES_SCHEMA.names)
    description = "face detection (OpenCV Haar by default; YuNet/SCRFD ONNX) and Gaussian blur inside the boxes"

    def config_for_fingerprint(self, ctx: StageContext) -> dict:
        ing = ctx.config.ingest  # re-encoding follows ingest's format and quality
        return {**super().config_for_fingerprint(ctx), "encode": [ing.encode_format, ing.encode_quality]}

    def batch_kwargs(self, ctx: StageContext) -> dict:
        cfg, ing = ctx.section, ctx.config.ingest
        return {"detector": cfg.detector, "model": str(cfg.model) if cfg.model else None, "margin": cfg.margin,
                "min_size": cfg.min_size, "score_threshold": cfg.score_threshold,
                "encode_format": ing.encode_format, "encode_quality": ing.encode_quality}


