"""Teacher centring shared by the DINO and iBOT losses: EMA centre + softmax, and Sinkhorn-Knopp.

Both work with no process group (single process) and across the workers of an initialised
``torch.distributed`` process group, where they give the same result as one process holding the
whole global batch:

* :class:`EMACenter` all-reduces the sum of the teacher logits *and* the row count, so the batch
  centre is the exact global mean even with unequal per-worker batches. The all-reduce may be
  launched asynchronously (``async_op=True``, as in the official code) and is then waited for
  lazily, at the next :meth:`EMACenter.softmax_center`, :meth:`EMACenter.apply_center_update`,
  ``update_center`` or state-dict save; read ``center`` only after one of these. With no process
  group, or ``async_op=False``, the centre is updated at once.
* :func:`sinkhorn_knopp` all-reduces the total mass, the per-prototype row sums and the total number
  of samples ``B`` (the official code assumes ``B = local_B * world_size``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["EMACenter", "sinkhorn_knopp", "dist_active"]


def dist_active() -> bool:
    """True when a default torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


class EMACenter(nn.Module):
    """EMA centre of teacher logits (buffer ``center [1, dim]``) and the centred teacher softmax."""

    def __init__(self, dim: int, momentum: float = 0.9, group: Any = None) -> None:
        super().__init__()
        self.dim = dim
        self.momentum = momentum
        self.group = group
        self.register_buffer("center", torch.zeros(1, dim))
        self._pending: Tensor | None = None  # [1, dim + 1]: sum of logits, then the row count
        self._handle: Any = None

    @torch.no_grad()
    def softmax_center(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``softmax((teacher_logits - center) / teacher_temp)`` over the last dim (float32)."""
        self.apply_center_update()
        return F.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor, async_op: bool = True) -> None:
        """Start ``center <- m * center + (1 - m) * mean(teacher_logits)``; mean over all rows of all workers."""
        self.apply_center_update()  # at most one update in flight
        x = teacher_logits.detach().float().reshape(-1, self.dim)
        count = torch.full((1, 1), float(x.shape[0]), device=x.device)
        self._pending = torch.cat([x.sum(dim=0, keepdim=True), count], dim=1)
        if dist_active():
            self._handle = dist.all_reduce(self._pending, group=self.group, async_op=async_op)
        if not (async_op and self._handle is not None):  # nothing in flight: fold in now
            self.apply_center_update()

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Wait for a pending all-reduce (if any) and fold the batch mean into the centre."""
        if self._pending is None:
            return
        if self._handle is not None:
            self._handle.wait()
        total, count = self._pending[:, :-1], self._pending[0, -1]
        self._pending, self._handle = None, None
        if count > 0:
            batch_center = (total / count).to(self.center.device, self.center.dtype)
            self.center.mul_(self.momentum).add_(batch_center, alpha=1.0 - self.momentum)

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self.apply_center_update()
        super()._save_to_state_dict(destination, prefix, keep_vars)


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, group: Any = None) -> Tensor:
    """Sinkhorn-Knopp teacher targets ``[..., K]`` (rows sum to 1) from logits ``[..., K]``, global over workers.

    Same iteration as the official ``sinkhorn_knopp_teacher``: ``Q = exp(logits / T)^T`` (K x B),
    normalised to total mass 1, then ``n_iterations`` times: rows (prototypes) to mass ``1/K`` and
    columns (samples) to mass ``1/B``; finally columns are scaled by ``B``. Before ``exp`` a constant
    per prototype (its global max logit) is subtracted — the first row normalisation cancels it
    exactly — so large logits or small temperatures cannot overflow (with ``n_iterations=0`` a single
    global max is subtracted, which the total-mass normalisation cancels).
    """
    shape = teacher_logits.shape
    K = shape[-1]
    logits = teacher_logits.float().reshape(-1, K) / teacher_temp  # B x K
    active = dist_active()

    # per-prototype (global) max, -inf for a worker holding no samples
    if logits.shape[0] > 0:
        shift = logits.amax(dim=0)
    else:
        shift = torch.full((K,), float("-inf"), device=logits.device)
    if active:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
    if n_iterations == 0:
        shift = shift.max().expand(K)
    Q = torch.exp(logits - shift).t()  # K x B

    B = torch.tensor(float(Q.shape[1]), device=Q.device)
    sum_Q = Q.sum()
    if active:
        stats = torch.stack([sum_Q, B])
        dist.all_reduce(stats, group=group)
        sum_Q, B = stats[0], stats[1]
    Q /= sum_Q
    for _ in range(n_iterations):
        sum_of_rows = Q.sum(dim=1, keepdim=True)
        if active:
            dist.all_reduce(sum_of_rows, group=group)
        Q /= sum_of_rows
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t().reshape(shape)


class CenteredLoss(nn.Module):
    """Base of the DINO and iBOT losses: student temperature and the teacher centring they share."""

    def __init__(self, dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.centering = EMACenter(dim, momentum=center_momentum)

    @property
    def center(self) -> Tensor:
        """The EMA centre ``[1, dim]`` (pending updates applied)."""
        self.centering.apply_center_update()
        return self.centering.center

    def softmax_center_teacher(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """Teacher targets by EMA centring: ``softmax((t - center) / teacher_temp)``."""
        return self.centering.softmax_center(teacher_logits, teacher_temp)

    def sinkhorn_knopp_teacher(self, teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
        """Teacher targets by Sinkhorn-Knopp over the global (all-worker) batch (``[..., K]`` in and out)."""
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations=n_iterations)

    def update_center(self, teacher_logits: Tensor, async_op: bool = True) -> None:
        """Fold the (global) batch mean of the raw teacher logits into the EMA centre."""
        self.centering.update_center(teacher_logits, async_op=async_op)
