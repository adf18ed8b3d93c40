"""KoLeo regulariser (Kozachenko-Leonenko differential-entropy estimator, Sablayrolles et al. 2019).

``-mean_i log(||x_i - x_nn(i)|| + eps)`` over L2-normalised vectors, as in facebookresearch/dinov2
``dinov2/loss/koleo_loss.py``. Differences, both for robustness: a batch of fewer than two vectors
has no neighbour, so the loss is defined as 0 there (the official gives ``-log(eps)``-sized
garbage); the self-similarity is masked with ``-inf`` (the official uses ``-1``, which ties with an
antipodal vector and can pick a point as its own neighbour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KoLeoLoss"]


class KoLeoLoss(nn.Module):
    """Nearest-neighbour log-distance spreading loss on L2-normalised features ``[B, D]``."""

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        """``-mean(log(nn_distance + eps))`` in float32; 0 (still attached to the graph) when ``B < 2``."""
        n = student_output.shape[0]
        if n < 2:
            return (student_output.float() * 0.0).sum()
        with torch.autocast(device_type=student_output.device.type, enabled=False):
            x = F.normalize(student_output.float(), p=2, dim=-1, eps=eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(float("-inf"))
                nn_index = dots.argmax(dim=1)
            distances = torch.linalg.vector_norm(x - x[nn_index], dim=-1)
            return -torch.log(distances + eps).mean()
