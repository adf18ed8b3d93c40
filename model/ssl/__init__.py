"""DINOv2 self-supervised training logic: config, schedules, param groups, EMA, loss terms, meta-architecture.

Attributes are imported lazily so that ``from model.ssl import SSLConfig`` (e.g. from the pipeline
config schema) does not import torch.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "SSLConfig": "model.ssl.config",
    "CosineScheduler": "model.ssl.schedules",
    "Schedules": "model.ssl.schedules",
    "ScheduleValues": "model.ssl.schedules",
    "apply_optim_scheduler": "model.ssl.schedules",
    "get_params_groups_with_decay": "model.ssl.param_groups",
    "fuse_params_groups": "model.ssl.param_groups",
    "ema_update": "model.ssl.ema",
    "LossTerm": "model.ssl.loss_terms",
    "LossComposition": "model.ssl.loss_terms",
    "default_loss_terms": "model.ssl.loss_terms",
    "SSLMetaArch": "model.ssl.meta_arch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'model.ssl' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
