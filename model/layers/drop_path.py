"""Stochastic depth: plain DropPath, and the efficient subset variants of the official DINOv2 code.

The efficient variants compute a residual branch only on a random subset of the samples
(`max(int(n * (1 - p)), 1)` of `n`, as the official `drop_add_residual_stochastic_depth`) and add it
back with `index_add`, scaled by `n / subset`, so the expectation equals the undropped block.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from .packing import PackedSeqs


def drop_path(x: Tensor, drop_prob: float = 0.0, training: bool = False) -> Tensor:
    """Zero whole samples with probability `drop_prob`, scaling the kept ones by 1/(1-p)."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
    if keep_prob > 0.0:
        mask.div_(keep_prob)
    return x * mask


class DropPath(nn.Module):
    """Module form of `drop_path` (per-sample stochastic depth)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        """Apply stochastic depth in training mode; identity in eval mode."""
        return drop_path(x, self.drop_prob, self.training)


def drop_add_residual_stochastic_depth(
    x: Tensor, residual_func: Callable[[Tensor], Tensor], sample_drop_ratio: float = 0.0
) -> Tensor:
    """x + residual on a random subset of the batch, scaled by batch/subset (official algorithm)."""
    b = x.shape[0]
    subset = max(int(b * (1 - sample_drop_ratio)), 1)
    brange = torch.randperm(b, device=x.device)[:subset]
    residual = residual_func(x[brange])
    out = torch.index_add(x.flatten(1), 0, brange, residual.flatten(1).to(x.dtype), alpha=b / subset)
    return out.view_as(x)


def drop_add_residual_packed(
    x: Tensor,
    seqs: PackedSeqs,
    residual_func: Callable[[Tensor, PackedSeqs], Tensor],
    sample_drop_ratio: float = 0.0,
) -> Tensor:
    """Packed [1, ΣL, D] version: the branch runs on a subset of the sequences of every group."""
    sub, index, scale = seqs.sample_subset(sample_drop_ratio, x.device)
    residual = residual_func(x[:, index], sub)
    return torch.index_add(x, 1, index, (residual * scale[None, :, None]).to(x.dtype))  # scale kept in fp32
