"""Student/teacher meta-architecture of DINOv2 (``SSLMetaArch``).

- student = {backbone, dino_head[, ibot_head]}; teacher = the same modules, no gradients,
  initialised from the student and updated by EMA (``update_teacher``). The teacher backbone
  has no stochastic depth (as the official ``only_teacher`` build).
- ``forward_backward(batch, teacher_temp)``: ONE packed student forward over global + local
  crops (``backbone.forward_features_list``, block-diagonal attention), teacher forward on the
  global crops only, teacher centring (EMA centre or Sinkhorn-Knopp, ``cfg.train.centering``),
  one student head call over all CLS (+ masked patch) tokens, then the declarative loss sum
  (``model.ssl.loss_terms``) and ``backward``. Returns ``{"total": …, "dino": …, "ibot": …,
  "koleo": …}`` (floats, unweighted per-term values).
- ``train_step`` = schedules → zero grad → forward_backward → last-layer freeze → gradient
  clipping (per student module, 3.0) → optimizer step → EMA teacher update.
- bf16 autocast around the forward passes when ``cfg.compute.autocast_dtype == "bf16"`` (CPU and
  CUDA); losses are computed in float32. On CPU the student pass uses the SDPA "math" backend
  (``cfg.compute.cpu_student_attention``): PyTorch's CPU flash-attention backward is several times
  slower for the short local-crop sequences.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from model.layers.dino_head import DINOHead
from model.layers.vit import build_backbone
from model.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from model.ssl.config import SSLConfig
from model.ssl.ema import ema_update
from model.ssl.loss_terms import LossComposition, default_loss_terms
from model.ssl.param_groups import fuse_params_groups, get_params_groups_with_decay
from model.ssl.schedules import ScheduleValues, apply_optim_scheduler

N_GLOBAL_CROPS = 2


def backbone_kwargs(cfg: SSLConfig, teacher: bool = False) -> dict[str, Any]:
    s = cfg.student
    kw: dict[str, Any] = dict(
        img_size=cfg.crops.global_crops_size,
        patch_size=s.patch_size,
        init_values=s.layerscale,
        ffn_layer=s.ffn_layer,
        qkv_bias=s.qkv_bias,
        proj_bias=s.proj_bias,
        ffn_bias=s.ffn_bias,
        num_register_tokens=s.num_register_tokens,
        interpolate_antialias=s.interpolate_antialias,
        interpolate_offset=s.interpolate_offset,
        drop_path_rate=0.0 if teacher else s.drop_path_rate,
        drop_path_uniform=s.drop_path_uniform,
    )
    kw.update(s.backbone_kwargs)
    if teacher:
        kw["drop_path_rate"] = 0.0
    return kw


def _entropy(p: Tensor) -> Tensor:
    return -(p * p.clamp_min(1e-30).log()).sum(-1)


def build_ssl_modules(cfg: SSLConfig, teacher: bool = False, backbone: nn.Module | None = None) -> nn.ModuleDict:
    """``{backbone, dino_head[, ibot_head]}`` from the config (or around a given backbone)."""
    if backbone is None:
        backbone = build_backbone(cfg.student.arch, **backbone_kwargs(cfg, teacher))
    d, i = cfg.dino, cfg.ibot
    mods: dict[str, nn.Module] = {
        "backbone": backbone,
        "dino_head": DINOHead(backbone.embed_dim, d.head_n_prototypes, nlayers=d.head_nlayers,
                              hidden_dim=d.head_hidden_dim, bottleneck_dim=d.head_bottleneck_dim),
    }
    if i.loss_weight > 0 and i.separate_head:
        mods["ibot_head"] = DINOHead(backbone.embed_dim, i.head_n_prototypes, nlayers=i.head_nlayers,
                                     hidden_dim=i.head_hidden_dim, bottleneck_dim=i.head_bottleneck_dim)
    return nn.ModuleDict(mods)


class SSLMetaArch(nn.Module):
    def __init__(self, cfg: SSLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.do_dino = cfg.dino.loss_weight > 0
        self.do_koleo = cfg.dino.koleo_loss_weight > 0
        self.do_ibot = cfg.ibot.loss_weight > 0
        self.ibot_separate_head = cfg.ibot.separate_head
        self.n_local_crops = cfg.crops.local_crops_number

        self.mask_student_inputs = True  # iBOT: masked patches replaced by the mask token in the student input
        self.student = build_ssl_modules(cfg, teacher=False)
        self.teacher = self.build_teacher(cfg)
        self.teacher.requires_grad_(False)
        self.teacher.eval()

        ibot_dim = cfg.ibot.head_n_prototypes if self.ibot_separate_head else cfg.dino.head_n_prototypes
        self.dino_loss = DINOLoss(cfg.dino.head_n_prototypes, cfg.dino.student_temp, cfg.dino.center_momentum)
        self.ibot_patch_loss = iBOTPatchLoss(ibot_dim, cfg.ibot.student_temp, cfg.ibot.center_momentum)
        self.koleo_loss = KoLeoLoss()
        self.loss_terms = LossComposition(
            default_loss_terms(
                self.dino_loss if self.do_dino else None,
                self.ibot_patch_loss if self.do_ibot else None,
                self.koleo_loss if self.do_koleo else None,
                dino_weight=cfg.dino.loss_weight,
                ibot_weight=cfg.ibot.loss_weight,
                koleo_weight=cfg.dino.koleo_loss_weight,
            )
        )
        self.last_stats: dict[str, float] = {}

    def build_teacher(self, cfg: SSLConfig) -> nn.ModuleDict:
        """The EMA teacher: the student's modules without stochastic depth, starting from the student's weights."""
        teacher = build_ssl_modules(cfg, teacher=True)
        teacher.load_state_dict(self.student.state_dict())
        return teacher

    # ------------------------------------------------------------------ helpers
    def train(self, mode: bool = True) -> "SSLMetaArch":
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout / drop path / BN updates)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.cfg.compute.autocast_dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def student_attention(self) -> contextlib.AbstractContextManager:
        """SDPA backend for the student pass (see ``ComputeConfig.cpu_student_attention``)."""
        if self.device.type == "cpu" and self.cfg.compute.cpu_student_attention == "math":
            return sdpa_kernel([SDPBackend.MATH])
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def teacher_targets(self, global_crops: Tensor, mask_indices: Tensor, teacher_temp: float) -> tuple[Tensor, Tensor | None]:
        """Centred teacher probabilities: DINO ``[n_global, B, K]`` and iBOT ``[M, K']`` (or None)."""
        n_g = N_GLOBAL_CROPS
        with self.autocast():
            out = self.teacher["backbone"].forward_features(global_crops)
            cls = out["x_norm_clstoken"]
            patch = out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices) if self.do_ibot else None
            if patch is not None and not self.ibot_separate_head:
                heads = self.teacher["dino_head"](torch.cat([cls, patch]))
                cls_logits, patch_logits = heads[: len(cls)], heads[len(cls) :]
            else:
                cls_logits = self.teacher["dino_head"](cls)
                patch_logits = self.teacher["ibot_head"](patch) if patch is not None else None
        cls_logits = cls_logits.float()
        patch_logits = patch_logits.float() if patch_logits is not None else None
        if self.cfg.train.centering == "centering":
            dino_t = self.dino_loss.softmax_center_teacher(cls_logits, teacher_temp)
            self.dino_loss.update_center(cls_logits)
            ibot_t = None
            if patch_logits is not None:
                ibot_t = self.ibot_patch_loss.softmax_center_teacher(patch_logits, teacher_temp)
                self.ibot_patch_loss.update_center(patch_logits)
        else:  # sinkhorn_knopp
            dino_t = self.dino_loss.sinkhorn_knopp_teacher(cls_logits, teacher_temp)
            ibot_t = self.ibot_patch_loss.sinkhorn_knopp_teacher(patch_logits, teacher_temp) if patch_logits is not None else None
        return dino_t.unflatten(0, (n_g, -1)), ibot_t

    def student_outputs(self, global_crops: Tensor, local_crops: Tensor, masks: Tensor, mask_indices: Tensor) -> dict[str, Tensor]:
        """One packed backbone pass over all crops, one head call over all tokens that need it."""
        n_l = self.n_local_crops
        backbone = self.student["backbone"]
        with self.autocast(), self.student_attention():
            if n_l > 0:
                g_masks = masks if self.mask_student_inputs else None
                g_out, l_out = backbone.forward_features_list([global_crops, local_crops], [g_masks, None])
                l_cls = l_out["x_norm_clstoken"]
            else:
                (g_out,) = backbone.forward_features_list([global_crops], [masks if self.mask_student_inputs else None])
                l_cls = g_out["x_norm_clstoken"][:0]
            g_cls = g_out["x_norm_clstoken"]
            head_in = [l_cls, g_cls]
            patch = None
            if self.do_ibot:
                patch = g_out["x_norm_patchtokens"].flatten(0, 1).index_select(0, mask_indices)
                if not self.ibot_separate_head:
                    head_in.append(patch)
            head_out = self.student["dino_head"](torch.cat(head_in))
            sizes = [len(t) for t in head_in]
            parts = list(head_out.split(sizes))
            out = {
                "student_local_cls_head": parts[0].float(),
                "student_global_cls_head": parts[1].float(),
                "student_global_cls": g_cls.float(),
            }
            if self.do_ibot:
                patch_head = parts[2] if not self.ibot_separate_head else self.student["ibot_head"](patch)
                out["student_masked_patch_head"] = patch_head.float()
        return out

    def forward_backward(self, batch: Mapping[str, Any], teacher_temp: float) -> dict[str, float]:
        """Compute every loss term, backpropagate their weighted sum; returns ``{"total", <term>: value}``."""
        dev = self.device
        global_crops = batch["collated_global_crops"].to(dev, non_blocking=True)
        local_crops = batch["collated_local_crops"].to(dev, non_blocking=True)
        masks = batch["collated_masks"].to(dev, non_blocking=True)
        mask_indices = batch["mask_indices_list"].to(dev, non_blocking=True)
        masks_weight = batch["masks_weight"].to(dev, non_blocking=True)
        n_g, n_l = N_GLOBAL_CROPS, self.n_local_crops
        if global_crops.shape[0] % n_g:
            raise ValueError(f"{global_crops.shape[0]} global crops is not a multiple of {n_g}")
        B = global_crops.shape[0] // n_g
        if n_l and local_crops.shape[0] != n_l * B:
            raise ValueError(f"expected {n_l * B} local crops for {B} images, got {local_crops.shape[0]}")

        dino_targets, ibot_targets = self.teacher_targets(global_crops, mask_indices, teacher_temp)
        outputs: dict[str, Any] = self.student_outputs(global_crops, local_crops, masks, mask_indices)
        outputs.update(
            n_global_crops=n_g,
            n_local_crops=n_l,
            teacher_dino_targets=dino_targets,
            teacher_masked_patch_targets=ibot_targets,
            masks=masks,
            masks_weight=masks_weight,
            n_masked_patches=int(mask_indices.shape[0]),
        )
        total, values = self.loss_terms.compute(outputs)
        total.backward()
        self._record_stats(dino_targets, int(mask_indices.shape[0]))
        return {"total": float(total.detach()), **{k: float(v.detach()) for k, v in values.items()}}

    @torch.no_grad()
    def _record_stats(self, dino_targets: Tensor, n_masked: int) -> None:
        p = dino_targets.flatten(0, 1)
        self.last_stats = {
            "teacher_entropy": float(_entropy(p).mean()),  # per-sample: → 0 if one-hot, → log K if uniform
            "teacher_batch_entropy": float(_entropy(p.mean(0))),  # of the mean: → 0 if all samples pick one prototype
            "log_k": math.log(p.shape[-1]),
            "n_masked_patches": float(n_masked),
        }

    # ------------------------------------------------------------------ optimisation
    def get_params_groups(self) -> list[dict[str, Any]]:
        o = self.cfg.optim
        groups: list[dict[str, Any]] = []
        for name, module in self.student.items():
            groups += get_params_groups_with_decay(
                module, lr_decay_rate=o.layerwise_decay, patch_embed_lr_mult=o.patch_embed_lr_mult, prefix=f"{name}."
            )
        return fuse_params_groups(groups)

    def make_optimizer(self) -> torch.optim.AdamW:
        o = self.cfg.optim
        sharded = any(hasattr(p, "to_local") for p in self.student.parameters())  # FSDP2 DTensors: foreach path
        fused = self.cfg.compute.fused_optimizer and self.device.type in ("cpu", "cuda") and not sharded
        return torch.optim.AdamW(self.get_params_groups(), betas=(o.adamw_beta1, o.adamw_beta2), fused=fused or None)

    def cancel_last_layer_gradients(self, iteration: int) -> bool:
        """Drop the prototype layers' gradients while ``iteration < freeze_last_layer_iters``; True if frozen."""
        if iteration >= self.cfg.freeze_last_layer_iters:
            return False
        for name, p in self.student.named_parameters():
            if "last_layer" in name:
                p.grad = None
        return True

    def clip_gradients(self, max_norm: float) -> dict[str, float]:
        """Clip each student module's gradient norm separately (official); returns the pre-clip norms."""
        norms = {}
        for name, module in self.student.items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[name] = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return norms

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        ema_update(self.student, self.teacher, momentum)

    def train_step(self, batch: Mapping[str, Any], optimizer: torch.optim.Optimizer, values: ScheduleValues) -> dict[str, float]:
        """One full iteration at ``values.iteration``; returns the loss terms."""
        apply_optim_scheduler(optimizer, values)
        optimizer.zero_grad(set_to_none=True)
        losses = self.forward_backward(batch, teacher_temp=values.teacher_temp)
        self.cancel_last_layer_gradients(values.iteration)
        if self.cfg.optim.clip_grad:
            self.clip_gradients(self.cfg.optim.clip_grad)
        optimizer.step()
        self.update_teacher(values.momentum)
        return losses
