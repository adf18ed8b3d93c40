"""The result of a training run on disk, and loading it back as a distillation teacher.

``export/`` (written by worker 0 at the end of ``lvd train`` / ``lvd distill``):

- ``backbone.pth`` — plain state dict in the official DINOv2 key layout,
- ``backbone_timm.pth`` — the same weights in timm's ``vit_*_patch14_dinov2`` layout,
- ``model.json`` — architecture, timm model name + kwargs, the dataset fingerprint, the step,
- ``heads.pth`` — the DINO (and iBOT) heads of the same network (what distillation needs),
- ``ssl_config.json`` — the training config (so a teacher's heads can be rebuilt exactly).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from model.export import atomic_write, export_backbone, load_backbone, write_json_atomic
from model.ssl.config import SSLConfig
from model.ssl.meta_arch import backbone_kwargs
from model.train.job import TrainJob

HEADS_FILE = "heads.pth"
SSL_CONFIG_FILE = "ssl_config.json"


def export_result(job: TrainJob, modules: Mapping[str, Mapping[str, Tensor]]) -> dict[str, Any]:
    """Write the export of ``{backbone, dino_head[, ibot_head]}`` full state dicts; returns the paths."""
    cfg = job.ssl_config
    out = job.export_dir
    kwargs = backbone_kwargs(cfg, teacher=True)
    heads = {name: dict(sd) for name, sd in modules.items() if name != "backbone"}
    atomic_write(out / HEADS_FILE, lambda f: torch.save(heads, f))
    write_json_atomic(out / SSL_CONFIG_FILE, job.ssl)
    paths = export_backbone(dict(modules["backbone"]), out, arch=cfg.student.arch, backbone_kwargs=kwargs,
                            extra={"kind": job.kind, "steps": job.total_steps, **job.export_extra})
    return {"export_dir": str(out), **{k: str(v) for k, v in paths.items()}, "heads": str(out / HEADS_FILE)}


def load_teacher(path: str | Path | None) -> tuple[nn.Module, dict[str, Any] | None, SSLConfig]:
    """``(backbone, heads or None, teacher config)`` from an export directory of ``lvd train``.

    An official DINOv2 ``.pth`` (backbone only) gives ``heads=None``; the caller decides whether
    that is enough (distillation is not: see ``model.ssl.distill_arch``).
    """
    if path is None:
        raise ValueError("no teacher given")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"teacher {path} does not exist: give the export folder of an `lvd train` run "
                                f"(…/stages/train/<fingerprint>/work/export) or run `lvd train` first")
    backbone = load_backbone(path)
    if path.is_dir() and (path / HEADS_FILE).is_file():
        heads = torch.load(path / HEADS_FILE, map_location="cpu", weights_only=True)
        cfg = SSLConfig.model_validate(json.loads((path / SSL_CONFIG_FILE).read_text()))
        return backbone, heads, cfg
    return backbone, None, SSLConfig()
