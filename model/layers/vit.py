"""DINOv2 vision transformer with the official parameter names, plus a packed multi-crop forward."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .block import Block
from .mlp import Mlp, SwiGLUFFNFused
from .packing import PackedSeqs
from .patch_embed import PatchEmbed

FFN_LAYERS: dict[str, Callable[..., nn.Module]] = {"mlp": Mlp, "swiglufused": SwiGLUFFNFused, "swiglu": SwiGLUFFNFused}


def init_weights_vit_timm(module: nn.Module, name: str = "") -> None:
    """Official Linear init: truncated normal (std .02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class DinoVisionTransformer(nn.Module):
    """ViT backbone whose state dict loads official `dinov2_vit*14*_pretrain.pth` files with strict=True.

    To reproduce the released hub models use img_size=518 (37×37 position grid); the `_reg4` ones
    also use num_register_tokens=4, interpolate_antialias=True, interpolate_offset=0.0.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        act_layer: Callable[[], nn.Module] = nn.GELU,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
    ) -> None:
        super().__init__()
        if ffn_layer not in FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected one of {sorted(FFN_LAYERS)}")
        if num_register_tokens < 0:
            raise ValueError("num_register_tokens must be >= 0")
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            dpr = [drop_path_rate] * depth
        else:
            dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(
                dim=embed_dim,
                num_heads=num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                drop_path=dpr[i],
                norm_layer=norm_layer,
                act_layer=act_layer,
                ffn_layer=FFN_LAYERS[ffn_layer],
                init_values=init_values,
            )
            for i in range(depth)
        )
        self.norm = norm_layer(embed_dim)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: pos_embed trunc-normal .02, cls/register tokens normal 1e-6, Linear layers timm-style."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for name, module in self.named_modules():
            init_weights_vit_timm(module, name)

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """Bicubic resize of the learned grid to the input's patch grid, exactly as the official code.

        `w`, `h` are the input's dims 2 and 3 (the official naming). With `interpolate_offset` the
        resize is driven by the scale factor `(grid + offset) / M`, otherwise by the output size.
        """
        previous_dtype = x.dtype
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - 1
        if npatch == n and w == h:
            return self.pos_embed
        pos_embed = self.pos_embed.float()
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = x.shape[-1]
        w0, h0 = w // self.patch_size, h // self.patch_size
        m = int(math.sqrt(n))
        assert n == m * m, "the learned position grid must be square"
        kwargs: dict[str, Any] = {}
        if self.interpolate_offset:
            kwargs["scale_factor"] = (float(w0 + self.interpolate_offset) / m, float(h0 + self.interpolate_offset) / m)
        else:
            kwargs["size"] = (w0, h0)
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2),
            mode="bicubic",
            antialias=self.interpolate_antialias,
            **kwargs,
        )
        assert (w0, h0) == patch_pos_embed.shape[-2:]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1).to(previous_dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patch-embed, swap masked patches for `mask_token`, prepend CLS, add positions, insert registers."""
        _, _, w, h = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    def _split_output(self, x: Tensor, x_norm: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        """The official output dict for prenorm tokens `x` and normed tokens `x_norm`."""
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: Sequence[Tensor], masks_list: Sequence[Tensor | None]
    ) -> list[dict[str, Tensor | None]]:
        """All crops in one packed pass: tokens of every crop concatenated, block-diagonal attention."""
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list, strict=True)]
        seqs = PackedSeqs.from_tensors(tokens)
        x = seqs.pack(tokens)
        for blk in self.blocks:
            x = blk(x, seqs)
        x_norm = self.norm(x)
        return [
            self._split_output(xi, ni, m)
            for xi, ni, m in zip(seqs.unpack(x), seqs.unpack(x_norm), masks_list, strict=True)
        ]

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Official feature dict (`x_norm_clstoken`, `x_norm_regtokens`, `x_norm_patchtokens`, `x_prenorm`, `masks`)."""
        if isinstance(x, (list, tuple)):
            return self.forward_features_list(x, masks if masks is not None else [None] * len(x))
        x_tok = self.prepare_tokens_with_masks(x, masks)
        for blk in self.blocks:
            x_tok = blk(x_tok)
        return self._split_output(x_tok, self.norm(x_tok), masks)

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple[Any, ...]:
        """Patch tokens (and optionally CLS) of the last `n` blocks, or of the listed block indices (official API)."""
        tokens = self.prepare_tokens_with_masks(x)
        take = set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        outputs = []
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens)
            if i in take:
                outputs.append(tokens)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, w, h = x.shape
            outputs = [
                out.reshape(b, w // self.patch_size, h // self.patch_size, -1).permute(0, 3, 1, 2).contiguous()
                for out in outputs
            ]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    def forward(
        self, x: Tensor | Sequence[Tensor], masks: Any = None, is_training: bool = False
    ) -> Tensor | dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """`head(x_norm_clstoken)` (head is Identity); the feature dict(s) when `is_training`."""
        ret = self.forward_features(x, masks)
        if is_training:
            return ret
        assert isinstance(ret, dict), "list input needs is_training=True"
        return self.head(ret["x_norm_clstoken"])


def _vit(embed_dim: int, depth: int, num_heads: int, kwargs: dict[str, Any]) -> DinoVisionTransformer:
    """Factory defaults of the DINOv2 training configs (patch 14, img 224, LayerScale 1e-5); kwargs override."""
    defaults = {"patch_size": 14, "img_size": 224, "init_values": 1e-5, "mlp_ratio": 4}
    size = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
    return DinoVisionTransformer(**{**defaults, **size, **kwargs})


def vit_test(**kwargs: Any) -> DinoVisionTransformer:
    """Minimal ViT for unit tests: dim 64, 2 heads, 2 blocks."""
    return _vit(64, 2, 2, kwargs)


def vit_tiny(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-Ti/14: dim 192, 3 heads, 12 blocks."""
    return _vit(192, 12, 3, kwargs)


def vit_small(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-S/14: dim 384, 6 heads, 12 blocks."""
    return _vit(384, 12, 6, kwargs)


def vit_base(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-B/14: dim 768, 12 heads, 12 blocks."""
    return _vit(768, 12, 12, kwargs)


def vit_large(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-L/14: dim 1024, 16 heads, 24 blocks."""
    return _vit(1024, 24, 16, kwargs)


def vit_giant2(**kwargs: Any) -> DinoVisionTransformer:
    """ViT-g/14: dim 1536, 24 heads, 40 blocks, fused SwiGLU FFN (hidden 4096)."""
    return _vit(1536, 40, 24, {"ffn_layer": "swiglufused", **kwargs})


BACKBONES: dict[str, Callable[..., DinoVisionTransformer]] = {
    f.__name__: f for f in (vit_test, vit_tiny, vit_small, vit_base, vit_large, vit_giant2)
}


def build_backbone(arch: str, **kwargs: Any) -> DinoVisionTransformer:
    """Build a registered backbone by name ("vit_small", ...), forwarding constructor overrides."""
    if arch not in BACKBONES:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(BACKBONES)}")
    return BACKBONES[arch](**kwargs)
