"""Image embedding models for the ``embed`` stage: spec strings, weights resolution, the Embedder.

``parse_spec`` / ``ModelSpec`` (no heavy imports), ``check_weights`` / ``fetch_weights`` /
``WeightsUnavailable`` (cache lookup without downloading; download on request), and ``Embedder``
(loaded lazily: importing this package does not import torch, open_clip or timm).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.embedding.spec import SPEC_FORMS, ModelSpec, parse_spec

if TYPE_CHECKING:
    from pipeline.embedding.embedder import Embedder
    from pipeline.embedding.weights import WeightsUnavailable, check_weights, fetch_weights, resolve_weights

__all__ = ["SPEC_FORMS", "Embedder", "ModelSpec", "WeightsUnavailable", "check_weights", "fetch_weights",
           "parse_spec", "resolve_weights"]

_LAZY = {
    "Embedder": "pipeline.embedding.embedder",
    "WeightsUnavailable": "pipeline.embedding.weights",
    "check_weights": "pipeline.embedding.weights",
    "fetch_weights": "pipeline.embedding.weights",
    "resolve_weights": "pipeline.embedding.weights",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipeline.embedding' has no attribute {name!r}")
