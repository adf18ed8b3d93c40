"""LayerScale (`gamma`), as in CaiT and the official DINOv2 blocks."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor


class LayerScale(nn.Module):
    """Per-channel learnable scale `gamma`, initialised to `init_values`."""

    def __init__(self, dim: int, init_values: float = 1e-5, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self) -> None:
        """Refill `gamma` with `init_values`."""
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        """Scale the last dimension by `gamma`."""
        return x.mul_(self.gamma) if self.inplace else x * self.gamma
