"""Packed multi-crop forward: one pass over all crops equals separate passes per crop size."""

from __future__ import annotations

import pytest
import torch

from model.layers.packing import PackedSeqs
from model.layers.vit import vit_test


def test_pack_unpack_roundtrip() -> None:
    xs = [torch.randn(2, 5, 3), torch.randn(4, 2, 3)]
    seqs = PackedSeqs.from_tensors(xs)
    assert seqs.groups == ((2, 5), (4, 2))
    assert seqs.seqlens == [5, 5, 2, 2, 2, 2]
    assert seqs.num_tokens == 18
    packed = seqs.pack(xs)
    assert packed.shape == (1, 18, 3)
    for a, b in zip(seqs.unpack(packed), xs):
        assert torch.equal(a, b)


def test_sample_subset_keeps_whole_sequences() -> None:
    torch.manual_seed(0)
    seqs = PackedSeqs(((2, 5), (8, 2)))
    sub, index, scale = seqs.sample_subset(0.4, torch.device("cpu"))
    assert sub.groups == ((1, 5), (4, 2))  # max(int(n * 0.6), 1)
    assert index.numel() == sub.num_tokens == 13 and index.unique().numel() == 13
    assert torch.equal(scale, torch.tensor([2.0] * 5 + [2.0] * 8))
    first = index[:5]
    assert torch.equal(first - first[0], torch.arange(5)) and int(first[0]) in (0, 5)
    starts = index[5:].reshape(4, 2)[:, 0]
    assert torch.all((starts - 10) % 2 == 0) and torch.all(starts >= 10)


@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
@pytest.mark.parametrize("registers", [0, 4])
def test_packed_equals_separate_passes(ffn: str, registers: int) -> None:
    torch.manual_seed(0)
    model = vit_test(img_size=56, ffn_layer=ffn, num_register_tokens=registers, init_values=1.0).eval()
    b = 2
    globals_ = torch.randn(2 * b, 3, 56, 56)
    locals_ = torch.randn(8 * b, 3, 28, 28)
    masks = torch.rand(2 * b, 16) < 0.4
    with torch.no_grad():
        packed = model.forward_features([globals_, locals_], [masks, None])
        sep = [model.forward_features(globals_, masks), model.forward_features(locals_)]
    assert len(packed) == 2
    for p, s in zip(packed, sep):
        assert set(p) == set(s)
        for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm"):
            assert p[key].shape == s[key].shape
            torch.testing.assert_close(p[key], s[key], atol=1e-5, rtol=1e-5)
    assert packed[0]["masks"] is masks and packed[1]["masks"] is None


def test_packed_runs_linear_layers_once_on_all_tokens() -> None:
    torch.manual_seed(0)
    model = vit_test(img_size=56).eval()
    seen: list[tuple[int, ...]] = []
    model.blocks[0].mlp.fc1.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    with torch.no_grad():
        model.forward_features([torch.randn(4, 3, 56, 56), torch.randn(16, 3, 28, 28)], [None, None])
    assert seen == [(1, 4 * 17 + 16 * 5, 64)]


def test_packed_training_drop_path_uses_sequence_subset() -> None:
    torch.manual_seed(0)
    model = vit_test(img_size=56, drop_path_rate=0.5, drop_path_uniform=True).train()
    seen: list[int] = []
    model.blocks[1].attn.qkv.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    out = model.forward_features([torch.randn(4, 3, 56, 56), torch.randn(16, 3, 28, 28)], [None, None])
    assert seen == [2 * 17 + 8 * 5]  # half of each crop group: 2 of 4 globals, 8 of 16 locals
    assert out[0]["x_norm_clstoken"].shape == (4, 64) and out[1]["x_norm_patchtokens"].shape == (16, 4, 64)
    out[0]["x_norm_clstoken"].sum().backward()
    assert model.blocks[1].attn.qkv.weight.grad is not None
