"""ViT building blocks with the official DINOv2 parameter layout."""

from .attention import Attention, dot_product_attention
from .block import Block
from .drop_path import DropPath, drop_add_residual_packed, drop_add_residual_stochastic_depth, drop_path
from .layer_scale import LayerScale
from .mlp import Mlp, SwiGLUFFN, SwiGLUFFNFused, swiglu_hidden
from .packing import PackedSeqs
from .patch_embed import PatchEmbed
from .vit import (
    BACKBONES,
    DinoVisionTransformer,
    build_backbone,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_test,
    vit_tiny,
)

__all__ = [
    "Attention",
    "BACKBONES",
    "Block",
    "DinoVisionTransformer",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PackedSeqs",
    "PatchEmbed",
    "SwiGLUFFN",
    "SwiGLUFFNFused",
    "build_backbone",
    "dot_product_attention",
    "drop_add_residual_packed",
    "drop_add_residual_stochastic_depth",
    "drop_path",
    "swiglu_hidden",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_test",
    "vit_tiny",
]
