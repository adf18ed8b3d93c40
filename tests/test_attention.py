"""Attention: reference maths, packed block-diagonal SDPA path, and the xformers call contract."""

from __future__ import annotations

import types

import pytest
import torch

from model.layers import packing
from model.layers.attention import Attention, dot_product_attention
from model.layers.packing import PackedSeqs


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """The official non-fused `Attention.forward`: explicit softmax(q k^T / sqrt(d)) v."""
    b, n, c = x.shape
    h = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * (c // h) ** -0.5, qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    return attn.proj((a @ v).transpose(1, 2).reshape(b, n, c))


def test_attention_matches_reference() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_packed_attention_is_block_diagonal() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True).eval()
    xs = [torch.randn(2, 9, 32), torch.randn(3, 4, 32), torch.randn(1, 4, 32)]
    seqs = PackedSeqs.from_tensors(xs)
    packed_out = seqs.unpack(attn(seqs.pack(xs), seqs))
    for out, x in zip(packed_out, xs):
        torch.testing.assert_close(out, _reference_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_sdpa_called_once_per_run_of_equal_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    seqs = PackedSeqs(((2, 5), (3, 5), (4, 3)))
    assert seqs.runs() == [(5, 5), (4, 3)]
    batches = []
    real = packing.sdpa_bmhk

    def counting(q: torch.Tensor, *args: object) -> torch.Tensor:
        batches.append(tuple(q.shape[:2]))
        return real(q, *args)

    monkeypatch.setattr(packing, "sdpa_bmhk", counting)
    q = torch.randn(1, seqs.num_tokens, 2, 8)
    assert seqs.attend(q, q, q).shape == q.shape
    assert batches == [(5, 5), (4, 3)]


class _FakeBlockDiagonalMask:
    def __init__(self, seqlens: list[int]) -> None:
        self.seqlens = seqlens

    @classmethod
    def from_seqlens(cls, seqlens: list[int]) -> _FakeBlockDiagonalMask:
        return cls(list(seqlens))


def _fake_xops(calls: list[tuple]) -> types.SimpleNamespace:
    """Stand-in for `xformers.ops` with the real signatures, computing the maths densely."""

    def memory_efficient_attention(q, k, v, attn_bias=None, p=0.0):  # noqa: ANN001, ANN202
        calls.append((tuple(q.shape), attn_bias))
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # BMHK -> BHMK
        mask = None
        if attn_bias is not None:
            ids = torch.repeat_interleave(torch.arange(len(attn_bias.seqlens)), torch.tensor(attn_bias.seqlens))
            mask = ids[:, None] == ids[None, :]
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask).transpose(1, 2)

    fmha = types.SimpleNamespace(BlockDiagonalMask=_FakeBlockDiagonalMask)
    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention, fmha=fmha)


def test_xformers_path_contract(monkeypatch: pytest.MonkeyPatch) -> None:
    """With xformers 'available', dense and packed calls pass BMHK tensors and a BlockDiagonalMask of the seqlens."""
    calls: list[tuple] = []
    monkeypatch.setattr(packing, "xformers_ops", lambda: _fake_xops(calls))
    monkeypatch.setattr(packing, "use_xformers", lambda t: True)
    packing._block_diagonal_mask.cache_clear()
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    xs = [torch.randn(2, 6, 32), torch.randn(3, 3, 32)]
    seqs = PackedSeqs.from_tensors(xs)
    with torch.no_grad():
        dense = attn(xs[0])
        packed = seqs.unpack(attn(seqs.pack(xs), seqs))
    packing._block_diagonal_mask.cache_clear()
    assert calls[0] == ((2, 6, 4, 8), None)
    assert calls[1][0] == (1, 21, 4, 8) and calls[1][1].seqlens == [6, 6, 3, 3, 3]
    for out, x in zip(packed, xs):
        torch.testing.assert_close(out, _reference_attention(attn, x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dense, _reference_attention(attn, xs[0]), atol=1e-5, rtol=1e-5)


def test_cpu_tensors_use_sdpa() -> None:
    assert not packing.use_xformers(torch.zeros(1))
    q = torch.randn(2, 5, 2, 4)
    ref = torch.nn.functional.scaled_dot_product_attention(*(q.transpose(1, 2),) * 3).transpose(1, 2)
    torch.testing.assert_close(dot_product_attention(q, q, q), ref)
