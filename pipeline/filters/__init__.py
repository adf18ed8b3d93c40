"""Per-image filter models used by the ``nsfw`` and ``face_blur`` stages.

The classes here only load models and compute on images; the stages (and their Ray Data
wiring) live in ``pipeline/stages``. Each model loads once per instance, so a stage builds one
per actor.
"""
from __future__ import annotations

from pipeline.filters.faces import FaceBox, FaceDetector, blur_boxes, blur_faces_in_bytes, expand_box
from pipeline.filters.nsfw import NsfwScorer

__all__ = ["FaceBox", "FaceDetector", "NsfwScorer", "blur_boxes", "blur_faces_in_bytes", "expand_box"]
