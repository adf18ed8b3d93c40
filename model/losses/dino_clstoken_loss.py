"""DINO loss on CLS tokens: cross-entropy of every student crop against every teacher global crop.

Follows facebookresearch/dinov2 (``dinov2/loss/dino_clstoken_loss.py`` plus the pair averaging done
in ``SSLMetaArch.forward_backward``): same-view pairs (student global ``i`` vs teacher global ``i``)
are excluded, each pair's loss is a mean over the batch, and the sum is divided by the number of
pairs ``n_global * (n_global - 1) + n_local * n_global``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.losses.centering import EMACenter, sinkhorn_knopp

__all__ = ["DINOLoss"]


class DINOLoss(nn.Module):
    """Multi-crop DINO cross-entropy with EMA-centre or Sinkhorn-Knopp teacher centring."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.centering = EMACenter(out_dim, momentum=center_momentum)

    @property
    def center(self) -> Tensor:
        """The EMA centre ``[1, out_dim]`` (pending updates applied)."""
        self.centering.apply_center_update()
        return self.centering.center

    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets by EMA centring: ``softmax((t - center) / teacher_temp)``."""
        return self.centering.softmax_center(teacher_logits, teacher_temp)

    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher targets by Sinkhorn-Knopp over the global (all-worker) batch."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    def update_center(self, teacher_logits: Tensor, async_op: bool = True) -> None:
        """Fold the (global) batch mean of the raw teacher logits into the EMA centre."""
        self.centering.update_center(teacher_logits, async_op=async_op)

    def forward(
        self,
        student_global_logits: Tensor,
        teacher_global_probs: Tensor,
        student_local_logits: Tensor | None = None,
    ) -> Tensor:
        """Mean over (student crop, other teacher global crop) pairs of the batch-mean cross-entropy.

        Shapes: ``student_global_logits`` and ``teacher_global_probs`` ``[n_global, B, K]``,
        ``student_local_logits`` ``[n_local, B, K]`` or None; crop ``i`` of the student global crops
        and of the teacher targets is the same view.
        """
        n_global, batch, _ = teacher_global_probs.shape
        if student_global_logits.shape != teacher_global_probs.shape:
            raise ValueError(f"student globals {tuple(student_global_logits.shape)} != teacher {tuple(teacher_global_probs.shape)}")
        n_local = 0 if student_local_logits is None else student_local_logits.shape[0]
        n_pairs = n_global * (n_global - 1) + n_local * n_global
        if n_pairs == 0:
            raise ValueError("DINO loss needs at least two global crops or one local crop")

        t = teacher_global_probs.float()
        t_sum = t.sum(dim=0)  # [B, K]: a student crop's CE summed over teacher crops = CE with the summed targets
        lsm_g = F.log_softmax(student_global_logits.float() / self.student_temp, dim=-1)
        total = -((t_sum.unsqueeze(0) - t) * lsm_g).sum()  # excludes the same-view teacher crop
        if n_local:
            lsm_l = F.log_softmax(student_local_logits.float() / self.student_temp, dim=-1)
            total = total - (t_sum.unsqueeze(0) * lsm_l).sum()
        return total / (batch * n_pairs)
