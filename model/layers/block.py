"""Pre-norm transformer block with LayerScale and (efficient) stochastic depth."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
from torch import Tensor

from .attention import Attention
from .drop_path import DropPath, drop_add_residual_packed, drop_add_residual_stochastic_depth
from .layer_scale import LayerScale
from .mlp import Mlp
from .packing import PackedSeqs

# the subset trick pays for its indexing overhead only above this rate (official threshold)
SUBSET_DROP_THRESHOLD = 0.1


class Block(nn.Module):
    """x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x))); keys as the official DINOv2 `Block`."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: float | None = None,
        drop_path: float = 0.0,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        ffn_layer: Callable[..., nn.Module] = Mlp,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_bias, attn_drop, drop)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = ffn_layer(
            in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop, bias=ffn_bias
        )
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.sample_drop_ratio = drop_path

    def attn_residual(self, x: Tensor, seqs: PackedSeqs | None = None) -> Tensor:
        """The attention branch ls1(attn(norm1(x)))."""
        return self.ls1(self.attn(self.norm1(x), seqs))

    def ffn_residual(self, x: Tensor, seqs: PackedSeqs | None = None) -> Tensor:
        """The feed-forward branch ls2(mlp(norm2(x)))."""
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor, seqs: PackedSeqs | None = None) -> Tensor:
        """Apply the block to [B, N, D] tokens, or to packed [1, ΣL, D] tokens described by `seqs`."""
        p = self.sample_drop_ratio if self.training else 0.0
        if p > 0.0 and seqs is not None:  # packed: the samples are the sequences (official nested path)
            x = drop_add_residual_packed(x, seqs, self.attn_residual, p)
            return drop_add_residual_packed(x, seqs, self.ffn_residual, p)
        if p > SUBSET_DROP_THRESHOLD:
            x = drop_add_residual_stochastic_depth(x, self.attn_residual, p)
            return drop_add_residual_stochastic_depth(x, self.ffn_residual, p)
        if p > 0.0:
            x = x + self.drop_path1(self.attn_residual(x))
            return x + self.drop_path2(self.ffn_residual(x))
        x = x + self.attn_residual(x, seqs)
        return x + self.ffn_residual(x, seqs)
