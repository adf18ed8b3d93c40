"""Multi-head self-attention with the official DINOv2 parameter layout (`qkv`, `proj`)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from . import packing
from .packing import PackedSeqs


def dot_product_attention(
    q: Tensor, k: Tensor, v: Tensor, seqs: PackedSeqs | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Softmax attention on [B, N, H, K] q/k/v: xformers on CUDA when available, else SDPA; block-diagonal if `seqs`."""
    if seqs is not None:
        return seqs.attend(q, k, v, dropout_p)
    if packing.use_xformers(q):
        return packing.xformers_ops().memory_efficient_attention(q, k, v, p=dropout_p)
    return packing.sdpa_bmhk(q, k, v, dropout_p)


class Attention(nn.Module):
    """Self-attention; the same weights serve the xformers and the SDPA paths."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, seqs: PackedSeqs | None = None) -> Tensor:
        """Attend over [B, N, D] tokens (or packed [1, ΣL, D] with `seqs`)."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).unbind(2)
        out = dot_product_attention(q, k, v, seqs, self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))
