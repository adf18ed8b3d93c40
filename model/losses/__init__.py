"""DINOv2 losses: DINO (CLS), iBOT (masked patches), KoLeo, and the shared teacher centring."""

from model.losses.centering import EMACenter, dist_active, sinkhorn_knopp
from model.losses.dino_clstoken_loss import DINOLoss
from model.losses.ibot_patch_loss import iBOTPatchLoss, masks_weight_from_masks
from model.losses.koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "EMACenter", "KoLeoLoss", "dist_active", "iBOTPatchLoss", "masks_weight_from_masks", "sinkhorn_knopp"]
