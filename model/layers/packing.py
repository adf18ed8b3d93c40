"""Packed multi-crop sequences: many token sequences in one [1, ΣL, D] tensor, block-diagonal attention.

`PackedSeqs` is the single place where "sequence lengths → attention" is decided:
xformers `BlockDiagonalMask` on CUDA when xformers is importable, otherwise one
`scaled_dot_product_attention` call per run of equal-length sequences (the sequences of a run
become the batch dimension), which is exactly a block-diagonal mask without a dense ΣL×ΣL bias.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

_XOPS_UNSET: Any = object()
_xops: Any = _XOPS_UNSET


def xformers_ops() -> Any | None:
    """The `xformers.ops` module if importable and not disabled via XFORMERS_DISABLED, else None."""
    global _xops
    if _xops is _XOPS_UNSET:
        _xops = None
        if os.environ.get("XFORMERS_DISABLED") is None and importlib.util.find_spec("xformers") is not None:
            try:
                _xops = importlib.import_module("xformers.ops")
            except Exception:  # a broken xformers build must not break the CPU path
                _xops = None
    return _xops


def use_xformers(t: Tensor) -> bool:
    """True when attention on `t` should use xformers (importable and `t` on CUDA)."""
    return t.is_cuda and xformers_ops() is not None


@functools.lru_cache(maxsize=256)
def _block_diagonal_mask(seqlens: tuple[int, ...]) -> Any:
    """Cached xformers BlockDiagonalMask for the given sequence lengths."""
    return xformers_ops().fmha.BlockDiagonalMask.from_seqlens(list(seqlens))


def sdpa_bmhk(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
    """Dense SDPA on [B, M, H, K] tensors (xformers layout), returning [B, M, H, K]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class PackedSeqs:
    """Layout of sequences packed along dim 1: `groups[i] = (count, length)` in packing order."""

    groups: tuple[tuple[int, int], ...]

    @classmethod
    def from_tensors(cls, xs: Sequence[Tensor]) -> PackedSeqs:
        """Layout for packing each [n_i, L_i, D] tensor of `xs` as one group."""
        return cls(tuple((int(x.shape[0]), int(x.shape[1])) for x in xs))

    @property
    def seqlens(self) -> list[int]:
        """Length of every packed sequence, in order."""
        return [length for count, length in self.groups for _ in range(count)]

    @property
    def num_tokens(self) -> int:
        """Total packed length ΣL."""
        return sum(count * length for count, length in self.groups)

    def runs(self) -> list[tuple[int, int]]:
        """Groups with adjacent equal lengths merged: the batches of the SDPA path."""
        merged: list[list[int]] = []
        for count, length in self.groups:
            if count == 0:
                continue
            if merged and merged[-1][1] == length:
                merged[-1][0] += count
            else:
                merged.append([count, length])
        return [(c, n) for c, n in merged]

    def pack(self, xs: Sequence[Tensor]) -> Tensor:
        """Concatenate [n_i, L_i, D] tensors into one [1, ΣL, D] tensor."""
        return torch.cat([x.reshape(1, -1, x.shape[-1]) for x in xs], dim=1)

    def unpack(self, x: Tensor) -> list[Tensor]:
        """Split a packed [1, ΣL, ...] tensor back into one [n_i, L_i, ...] tensor per group."""
        parts = torch.split(x, [count * length for count, length in self.groups], dim=1)
        return [p.reshape(count, length, *x.shape[2:]) for p, (count, length) in zip(parts, self.groups)]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0) -> Tensor:
        """Block-diagonal attention of packed [1, ΣL, H, K] q/k/v; each sequence attends to itself only."""
        if use_xformers(q):
            mask = _block_diagonal_mask(tuple(self.seqlens))
            return xformers_ops().memory_efficient_attention(q, k, v, attn_bias=mask, p=dropout_p)
        outs, start = [], 0
        for count, length in self.runs():
            end = start + count * length
            qr, kr, vr = (t[:, start:end].reshape(count, length, *t.shape[2:]) for t in (q, k, v))
            outs.append(sdpa_bmhk(qr, kr, vr, dropout_p).reshape(1, end - start, *q.shape[2:]))
            start = end
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def sample_subset(self, drop_ratio: float, device: torch.device) -> tuple[PackedSeqs, Tensor, Tensor]:
        """Random kept sequences per group (official subset size `max(int(n*(1-p)), 1)`).

        Returns the subset layout, the packed token indices of the kept sequences, and the per-token
        residual scale `n / kept` of each token's group.
        """
        groups, index, scale, offset = [], [], [], 0
        for count, length in self.groups:
            if count == 0:
                groups.append((0, length))
                continue
            kept = max(int(count * (1 - drop_ratio)), 1)
            seqs = torch.randperm(count, device=device)[:kept]
            tokens = offset + seqs[:, None] * length + torch.arange(length, device=device)[None, :]
            index.append(tokens.reshape(-1))
            scale.append(torch.full((kept * length,), count / kept, device=device))
            groups.append((kept, length))
            offset += count * length
        if not index:
            return PackedSeqs(tuple(groups)), torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, device=device)
        return PackedSeqs(tuple(groups)), torch.cat(index), torch.cat(scale)
