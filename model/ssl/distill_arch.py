"""Distillation meta-architecture (DINOv2 §5): a frozen large teacher, a smaller student, an EMA of the student.

Following the paper's recipe: the teacher backbone is frozen (a checkpoint of ``lvd train`` or an
official DINOv2 backbone); the student is trained with the same DINO / iBOT / KoLeo terms as in
pretraining, with the teacher's outputs as targets; masking and stochastic depth are removed and
the iBOT term is applied to every patch token of the two global crops; a spare EMA of the
student (``student_ema``, momentum from the teacher-momentum schedule) is the result.

Teacher heads: taken, frozen, from the teacher checkpoint (``lvd train`` saves its trained DINO /
iBOT heads beside the backbone) — they define the prototype space the teacher was trained in,
so its targets are meaningful from the first step; this is what the paper does with its ViT-g.
Meta released backbone weights only, so for an official checkpoint the heads cannot be taken;
``DistillMetaArch`` then refuses with a message saying to pretrain heads first (see
``model.train.job``), rather than distilling against random prototypes.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from model.ssl.config import SSLConfig
from model.ssl.ema import ema_update
from model.ssl.meta_arch import SSLMetaArch, build_ssl_modules


def all_patch_masks(global_crops: Tensor, patch_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Masks selecting every patch of every global crop: ``(masks [B, N] bool, indices [B·N], weights [B·N])``."""
    b, _, h, w = global_crops.shape
    n = (h // patch_size) * (w // patch_size)
    masks = torch.ones(b, n, dtype=torch.bool)
    weights = torch.full((b * n,), 1.0 / n)
    return masks, torch.arange(b * n), weights


class DistillMetaArch(SSLMetaArch):
    """``SSLMetaArch`` whose teacher is a given frozen network and whose EMA tracks the student."""

    def __init__(self, cfg: SSLConfig, teacher: nn.ModuleDict) -> None:
        if "dino_head" not in teacher:
            raise ValueError("the distillation teacher needs its trained DINO head (teacher checkpoints of "
                             "`lvd train` have one; official DINOv2 files hold the backbone only)")
        object.__setattr__(self, "_given_teacher", teacher)  # read by build_teacher during SSLMetaArch.__init__
        super().__init__(cfg.with_updates(student={"drop_path_rate": 0.0}))  # no stochastic depth when distilling
        object.__delattr__(self, "_given_teacher")
        self.mask_student_inputs = False
        self.student_ema = copy.deepcopy(self.student)
        self.student_ema.requires_grad_(False)
        self.student_ema.eval()

    def build_teacher(self, cfg: SSLConfig) -> nn.ModuleDict:
        t = self._given_teacher
        k = t["dino_head"].last_layer.out_features
        if k != cfg.dino.head_n_prototypes:
            raise ValueError(f"teacher DINO head has {k} prototypes but the student config says "
                             f"{cfg.dino.head_n_prototypes}; they must match")
        if cfg.ibot.separate_head and "ibot_head" not in t:
            raise ValueError("ibot.separate_head is set but the teacher has no iBOT head")
        if cfg.ibot.separate_head and t["ibot_head"].last_layer.out_features != cfg.ibot.head_n_prototypes:
            raise ValueError(f"teacher iBOT head has {t['ibot_head'].last_layer.out_features} prototypes but the student "
                             f"config says {cfg.ibot.head_n_prototypes}; they must match")
        return t

    def train(self, mode: bool = True) -> "DistillMetaArch":
        super().train(mode)
        if hasattr(self, "student_ema"):
            self.student_ema.eval()
        return self

    def forward_backward(self, batch: Mapping[str, Any], teacher_temp: float) -> dict[str, float]:
        """iBOT on every patch of both global crops (no masking), then the pretraining losses."""
        masks, indices, weights = all_patch_masks(batch["collated_global_crops"], self.cfg.student.patch_size)
        batch = {**batch, "collated_masks": masks, "mask_indices_list": indices, "masks_weight": weights}
        return super().forward_backward(batch, teacher_temp)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """The teacher stays frozen; the spare EMA follows the student."""
        ema_update(self.student, self.student_ema, momentum)


def teacher_modules(cfg: SSLConfig, backbone: nn.Module, heads: Mapping[str, Any] | None) -> nn.ModuleDict:
    """Frozen teacher ``{backbone, dino_head[, ibot_head]}``: heads built from ``cfg`` and loaded from ``heads``."""
    mods = build_ssl_modules(cfg, teacher=True, backbone=backbone)
    if heads is None:
        raise ValueError("no teacher heads: distillation takes the teacher's trained DINO/iBOT heads from its "
                         "`lvd train` checkpoint (heads.pth); official DINOv2 checkpoints contain the backbone only")
    for name in list(mods.keys()):
        if name == "backbone":
            continue
        if name not in heads:
            raise ValueError(f"teacher heads file has no {name!r} (has {sorted(heads)})")
        mods[name].load_state_dict(heads[name], strict=True)
    mods.requires_grad_(False)
    return mods
