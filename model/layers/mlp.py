"""Feed-forward layers: the ViT MLP (`fc1`/`fc2`) and the official fused SwiGLU (`w12`/`w3`)."""

from __future__ import annotations

from typing import Callable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


class Mlp(nn.Module):
    """Linear → activation → Linear (official DINOv2/timm `Mlp`)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        """Apply the MLP to the last dimension."""
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def swiglu_hidden(hidden_features: int) -> int:
    """Official `SwiGLUFFNFused` width: 2/3 of the MLP width, rounded up to a multiple of 8."""
    return (int(hidden_features * 2 / 3) + 7) // 8 * 8


class SwiGLUFFN(nn.Module):
    """SwiGLU with packed `w12` (gate half first) and `w3`; hidden width used as given."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=bias)
        self.w3 = nn.Linear(hidden_features, out_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        """silu(x W1) * (x W2), then W3."""
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


class SwiGLUFFNFused(SwiGLUFFN):
    """Official `SwiGLUFFNFused` layout: hidden width shrunk by `swiglu_hidden` (ViT-g: 6144 → 4096)."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        hidden = swiglu_hidden(hidden_features or in_features)
        super().__init__(in_features, hidden, out_features, act_layer, drop, bias)
