"""Block-wise (BEiT-style) patch masking for iBOT, as facebookresearch/dinov2 ``dinov2/data/masking.py``.

The official generator draws from the global ``random`` module. Here every draw goes through an
``rng`` that may be a ``random.Random`` (the official draws, made reproducible: seeding it with ``s``
gives the masks the official code gives after ``random.seed(s)``), a ``numpy.random.Generator``,
an int seed (-> ``random.Random(seed)``), or None (the global ``random`` module, the official
behaviour). It is given to the constructor and may be overridden per call.
"""

from __future__ import annotations

import math
import random
from typing import Any, Union

import numpy as np

__all__ = ["MaskingGenerator", "RandomSource", "as_random"]

RandomSource = Union[random.Random, np.random.Generator, int, None]


class _NumpyRandom:
    """The few ``random.Random`` methods used here, drawn from a numpy Generator."""

    def __init__(self, gen: np.random.Generator) -> None:
        self.gen = gen

    def random(self) -> float:
        return float(self.gen.random())

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.random()

    def randint(self, a: int, b: int) -> int:
        return int(self.gen.integers(a, b + 1))

    def shuffle(self, x: list[Any]) -> None:
        perm = self.gen.permutation(len(x)).tolist()
        x[:] = [x[j] for j in perm]


def as_random(rng: RandomSource) -> Any:
    """An object with ``random()``, ``uniform(a, b)``, ``randint(a, b)`` and ``shuffle(list)``."""
    if rng is None:
        return random  # the module: global state, as the official code
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):
        return _NumpyRandom(rng)
    if isinstance(rng, (int, np.integer)):
        return random.Random(int(rng))
    if isinstance(rng, _NumpyRandom):
        return rng
    raise TypeError(f"unsupported random source {type(rng).__name__}")


class MaskingGenerator:
    """Random rectangular blocks of patches on an ``H x W`` grid until a target count is reached."""

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int | None = None,
        min_num_patches: int = 4,
        max_num_patches: float | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        rng: RandomSource = None,
    ) -> None:
        if not isinstance(input_size, tuple):
            input_size = (input_size, input_size)
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        if max_num_patches is None:
            max_num_patches = num_masking_patches if num_masking_patches is not None else self.num_patches
        self.max_num_patches = max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = as_random(rng)

    def __repr__(self) -> str:
        return (
            f"MaskingGenerator({self.height}, {self.width} -> [{self.num_masking_patches} ~ {self.max_num_patches}], "
            f"min_num_patches={self.min_num_patches}, log_aspect_ratio=({self.log_aspect_ratio[0]:.3f}, {self.log_aspect_ratio[1]:.3f}))"
        )

    def get_shape(self) -> tuple[int, int]:
        """The patch grid ``(H, W)``."""
        return self.height, self.width

    def add_block(self, mask: np.ndarray, max_mask_patches: float, rng: Any = None) -> int:
        """Try (up to 10 times) to mask one new block adding at most ``max_mask_patches``; return how many were added."""
        rng = self.rng if rng is None else rng
        delta = 0
        for _ in range(10):
            target_area = rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= max_mask_patches:  # the block adds something and not too much
                    block[...] = True
                    delta += new
                if delta > 0:
                    break
        return delta

    def __call__(self, num_masking_patches: int | None = None, rng: RandomSource = None) -> np.ndarray:
        """A bool ``[H, W]`` mask with at most ``num_masking_patches`` True (fewer if blocks stop fitting)."""
        if num_masking_patches is None:
            num_masking_patches = self.num_masking_patches or 0
        draw = self.rng if rng is None else as_random(rng)
        mask = np.zeros(self.get_shape(), dtype=bool)
        mask_count = 0
        while mask_count < num_masking_patches:
            max_mask_patches = min(num_masking_patches - mask_count, self.max_num_patches)
            delta = self.add_block(mask, max_mask_patches, draw)
            if delta == 0:
                break
            mask_count += delta
        return mask
