"""Image to patch embedding (`patch_embed.proj`, a strided convolution)."""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor


def make_2tuple(x: int | tuple[int, int]) -> tuple[int, int]:
    """`x` as an (H, W) pair."""
    if isinstance(x, tuple):
        assert len(x) == 2
        return x
    return (x, x)


class PatchEmbed(nn.Module):
    """2D image [B, C, H, W] → patch tokens [B, (H/p)·(W/p), D]."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = make_2tuple(img_size)
        self.patch_size = make_2tuple(patch_size)
        self.patches_resolution = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.patches_resolution[0] * self.patches_resolution[1]
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: Tensor) -> Tensor:
        """Embed non-overlapping patches; the input size must be a multiple of the patch size."""
        _, _, h, w = x.shape
        ph, pw = self.patch_size
        if h % ph or w % pw:
            raise ValueError(f"input {h}x{w} is not a multiple of patch size {ph}x{pw}")
        return self.proj(x).flatten(2).transpose(1, 2)
