"""DINO projection head: MLP -> bottleneck -> L2 normalisation -> weight-normalised prototypes.

Follows facebookresearch/dinov2 ``dinov2/layers/dino_head.py``. The prototype layer is an explicit
weight-normalised linear layer (:class:`WeightNormLinear`) instead of ``torch.nn.utils.weight_norm``:
it has plain ``nn.Parameter`` / buffer tensors, so FSDP2 (``fully_shard``, DTensor parameters) and
``state_dict`` save/load need nothing special, and its keys are the official ones.

State-dict keys of ``DINOHead(in_dim, out_dim, nlayers=3)`` (``use_bn=False``, ``mlp_bias=True``)::

    mlp.0.weight [hidden_dim, in_dim]            mlp.0.bias [hidden_dim]          (then GELU = mlp.1)
    mlp.2.weight [hidden_dim, hidden_dim]        mlp.2.bias [hidden_dim]          (then GELU = mlp.3)
    mlp.4.weight [bottleneck_dim, hidden_dim]    mlp.4.bias [bottleneck_dim]
    last_layer.weight_g [out_dim, 1]             last_layer.weight_v [out_dim, bottleneck_dim]

With ``use_bn=True`` a ``BatchNorm1d`` follows each hidden Linear, which shifts the indices
(``mlp.0`` Linear, ``mlp.1`` BN, ``mlp.2`` GELU, ``mlp.3`` Linear, ...), exactly as in the official
``nn.Sequential``. ``nlayers=1`` makes ``mlp`` a single Linear (keys ``mlp.weight``, ``mlp.bias``).
These are the keys of the official training checkpoints (``student.dino_head.*``), which
therefore load with ``strict=True``. Checkpoints written with
``torch.nn.utils.parametrizations.weight_norm`` (``last_layer.parametrizations.weight.original0/1``)
are also accepted on load and mapped to ``weight_g`` / ``weight_v``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOHead", "WeightNormLinear"]


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight ``g * v / ||v||`` (row-wise norm), as ``weight_norm(dim=0)``.

    ``trainable_g=False`` (default) keeps ``weight_g`` as a persistent buffer fixed at 1, so every
    prototype is a unit vector and only its direction (``weight_v``) is learned (DINO's
    ``norm_last_layer=True``). ``trainable_g=True`` makes ``weight_g`` a parameter initialised to 1,
    which is what the dinov2 code does (it fills ``weight_g`` with 1 but leaves it trainable).
    """

    def __init__(self, in_features: int, out_features: int, trainable_g: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        g = torch.ones(out_features, 1)
        if trainable_g:
            self.weight_g = nn.Parameter(g)
        else:
            self.register_buffer("weight_g", g)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Default ``nn.Linear`` init for the direction, ``g = 1`` (the official init)."""
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        with torch.no_grad():
            self.weight_g.fill_(1.0)

    @property
    def weight(self) -> Tensor:
        """The effective (normalised) weight ``[out_features, in_features]``."""
        v = self.weight_v
        return v * (self.weight_g / torch.linalg.vector_norm(v, dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        """Project ``x [..., in_features]`` onto the prototypes: ``[..., out_features]``."""
        return F.linear(x, self.weight)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # accept checkpoints saved with torch.nn.utils.parametrizations.weight_norm
        for old, new in (("parametrizations.weight.original0", "weight_g"), ("parametrizations.weight.original1", "weight_v")):
            if prefix + old in state_dict and prefix + new not in state_dict:
                state_dict[prefix + new] = state_dict.pop(prefix + old)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        trainable = isinstance(self.weight_g, nn.Parameter)
        return f"in_features={self.in_features}, out_features={self.out_features}, trainable_g={trainable}"


def _build_mlp(nlayers: int, in_dim: int, bottleneck_dim: int, hidden_dim: int, use_bn: bool, bias: bool) -> nn.Module:
    if nlayers == 1:
        return nn.Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = []
    dims = [in_dim] + [hidden_dim] * (nlayers - 1)
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if use_bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.GELU())
    layers.append(nn.Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2-normalise -> weight-normalised prototype layer ``last_layer``."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        mlp_bias: bool = True,
        trainable_g: bool = False,
    ) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        self.mlp = _build_mlp(nlayers, in_dim, bottleneck_dim, hidden_dim, use_bn, mlp_bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, trainable_g=trainable_g)
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: trunc-normal(std .02) Linear weights and zero biases in the MLP; prototypes as nn.Linear, g = 1."""
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                m.reset_parameters()
        self.last_layer.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        """Map features ``[..., in_dim]`` to prototype logits ``[..., out_dim]``."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)
