"""DINO loss on CLS tokens: cross-entropy of every student crop against every teacher global crop.

Follows facebookresearch/dinov2 (``dinov2/loss/dino_clstoken_loss.py`` plus the pair averaging done
in ``SSLMetaArch.forward_backward``): same-view pairs (student global ``i`` vs teacher global ``i``)
are excluded, each pair's loss is a mean over the batch, and the sum is divided by the number of
pairs ``n_global * (n_global - 1) + n_local * n_global``.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from model.losses.centering import CenteredLoss

__all__ = ["DINOLoss"]


class DINOLoss(CenteredLoss):
    """Multi-crop DINO cross-entropy with EMA-centre or Sinkhorn-Knopp teacher centring."""

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__(out_dim, student_temp, center_momentum)
        self.out_dim = out_dim

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
