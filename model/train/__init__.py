"""Training loops: ``model.train.local.train_local`` (single process, no Ray) for tests and debugging."""
from __future__ import annotations

__all__ = ["train_local", "LocalTrainResult"]


def __getattr__(name: str):
    if name in __all__:
        from model.train import local

        return getattr(local, name)
    raise AttributeError(f"module 'model.train' has no attribute {name!r}")
