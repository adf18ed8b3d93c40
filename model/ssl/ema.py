"""EMA teacher update: ``teacher ← m·teacher + (1 − m)·student`` on matching parameters.

Parameters are matched by name (``named_parameters``), so the student and teacher may be
any modules with the same parameter names (plain modules today; FSDP2-sharded modules
work too, since their parameters are DTensors whose local shards are updated in place by
the same foreach ops). Buffers are not averaged (the official code doesn't either).
"""
from __future__ import annotations

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    # DTensor (FSDP2) → its local shard; plain tensors unchanged
    return t.to_local() if hasattr(t, "to_local") else t


def matching_params(student: nn.Module, teacher: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    s_params = dict(student.named_parameters())
    t_params = dict(teacher.named_parameters())
    missing = set(t_params) ^ set(s_params)
    if missing:
        raise ValueError(f"student and teacher parameters differ: {sorted(missing)[:10]}")
    names = list(t_params)
    return [_local(s_params[n].detach()) for n in names], [_local(t_params[n].detach()) for n in names]


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """In place: ``t = m * t + (1 - m) * s`` for every matching parameter (foreach ops)."""
    s, t = matching_params(student, teacher)
    if not t:
        return
    # group by dtype/device: foreach ops need homogeneous lists for the fast path
    groups: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for si, ti in zip(s, t):
        key = (ti.dtype, ti.device)
        gs, gt = groups.setdefault(key, ([], []))
        gs.append(si.to(dtype=ti.dtype, device=ti.device))
        gt.append(ti)
    for gs, gt in groups.values():
        torch._foreach_mul_(gt, momentum)
        torch._foreach_add_(gt, gs, alpha=1.0 - momentum)


class EMATeacher:
    """Small helper bundling a (student, teacher) pair with an ``update(momentum)`` method."""

    def __init__(self, student: nn.Module, teacher: nn.Module) -> None:
        self.student = student
        self.teacher = teacher

    def update(self, momentum: float) -> None:
        ema_update(self.student, self.teacher, momentum)
