"""iBOT masked-patch loss: student patch logits vs teacher patch targets on masked patches only.

Follows facebookresearch/dinov2 ``dinov2/loss/ibot_patch_loss.py``: each masked patch of an image
has weight ``1 / (number of masked patches of that image)``, and the weighted sum is divided by the
number of images (global crops) in the batch, masked or not.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model.losses.centering import CenteredLoss

__all__ = ["iBOTPatchLoss", "masks_weight_from_masks"]


def masks_weight_from_masks(masks_flat: Tensor) -> Tensor:
    """Per masked patch (in ``masks_flat.nonzero()`` order) the weight 1 / masked patches in its image."""
    per_image = 1.0 / masks_flat.sum(dim=-1).clamp(min=1).float()
    return per_image.unsqueeze(-1).expand_as(masks_flat)[masks_flat]


class iBOTPatchLoss(CenteredLoss):
    """Masked-patch cross-entropy with EMA-centre or Sinkhorn-Knopp teacher centring."""

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(patch_out_dim, student_temp, center_momentum)
        self.patch_out_dim = patch_out_dim

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
