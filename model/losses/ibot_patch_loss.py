"""iBOT masked-patch loss: student patch logits vs teacher patch targets on masked patches only.

Follows facebookresearch/dinov2 ``dinov2/loss/ibot_patch_loss.py``: each masked patch of an image
has weight ``1 / (number of masked patches of that image)``, and the weighted sum is divided by the
number of images (global crops) in the batch, masked or not.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.losses.centering import EMACenter, sinkhorn_knopp

__all__ = ["iBOTPatchLoss", "masks_weight_from_masks"]


def masks_weight_from_masks(masks_flat: Tensor) -> Tensor:
    """Per masked patch (in ``masks_flat.nonzero()`` order) the weight 1 / masked patches in its image."""
    per_image = 1.0 / masks_flat.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks_flat)[masks_flat]


class iBOTPatchLoss(nn.Module):
    """Masked-patch cross-entropy with EMA-centre or Sinkhorn-Knopp teacher centring."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.patch_out_dim = patch_out_dim
        self.student_temp = student_temp
        self.centering = EMACenter(patch_out_dim, momentum=center_momentum)

    @property
    def center(self) -> Tensor:
        """The EMA centre ``[1, patch_out_dim]`` (pending updates applied)."""
        self.centering.apply_center_update()
        return self.centering.center

    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets by EMA centring: ``softmax((t - center) / teacher_temp)``."""
        return self.centering.softmax_center(teacher_logits, teacher_temp)

    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher targets by Sinkhorn-Knopp over the masked patches of all workers (``[M, K]`` in and out)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    def update_center(self, teacher_logits: Tensor, async_op: bool = True) -> None:
        """Fold the (global) mean of the raw teacher masked-patch logits into the EMA centre."""
        self.centering.update_center(teacher_logits, async_op=async_op)

    def _cross_entropy(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        return -(teacher_probs.float() * F.log_softmax(student_logits.float() / self.student_temp, dim=-1)).sum(dim=-1)

    def forward(self, student_patch_logits: Tensor, teacher_patch_probs: Tensor, student_masks_flat: Tensor) -> Tensor:
        """Dense form: ``[B, N, K]`` logits/targets and ``[B, N]`` bool masks; per-image mean over masked patches, mean over images."""
        ce = self._cross_entropy(student_patch_logits, teacher_patch_probs)  # [B, N]
        masks = student_masks_flat.float()
        per_image = (ce * masks).sum(dim=-1) / masks.sum(dim=-1).clamp(min=1.0)
        return per_image.mean()

    def forward_masked(
        self,
        student_patch_tokens_masked: Tensor,
        teacher_patch_tokens_masked: Tensor,
        student_masks_flat: Tensor,
        n_masked_patches: int | Tensor | None = None,
        masks_weight: Tensor | None = None,
    ) -> Tensor:
        """Packed form: ``[M, K]`` logits/targets of the masked patches (row-major mask order, rows past ``n_masked_patches`` ignored)."""
        ce = self._cross_entropy(student_patch_tokens_masked, teacher_patch_tokens_masked)  # [M]
        if n_masked_patches is not None:
            ce = ce[: int(n_masked_patches)]
        if masks_weight is None:
            masks_weight = masks_weight_from_masks(student_masks_flat)
        return (ce * masks_weight[: ce.shape[0]].to(ce.dtype)).sum() / student_masks_flat.shape[0]
