"""Efficient stochastic depth: branch computed on a subset only, unbiased in expectation."""

from __future__ import annotations

import torch

from model.layers.block import Block
from model.layers.drop_path import (
    DropPath,
    drop_add_residual_packed,
    drop_add_residual_stochastic_depth,
    drop_path,
)
from model.layers.packing import PackedSeqs
from model.layers.vit import vit_test

DRAWS = 4000


def _assert_unbiased(mean: torch.Tensor, target: torch.Tensor, residual: torch.Tensor, keep: float) -> None:
    """|mean - target| within 5 standard errors of a Bernoulli(keep)/keep-scaled residual."""
    stderr = residual.abs() * ((1 / keep - 1) / DRAWS) ** 0.5 + 1e-6
    z = ((mean - target) / stderr).abs().max().item()
    assert z < 5, f"max z-score {z:.2f}"


def _branch(rows: list[int]):  # noqa: ANN202
    """A nonlinear per-sample residual that records how many samples it was evaluated on."""

    def f(x: torch.Tensor) -> torch.Tensor:
        rows.append(x.shape[0])
        return torch.tanh(x) * 2 + 1

    return f


def test_plain_drop_path_is_per_sample_and_unbiased() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 3)
    out = drop_path(x, 0.25, training=True)
    per_sample = out[:, 0]
    assert torch.all((per_sample == 0) | torch.isclose(per_sample, torch.tensor(4 / 3)))
    assert torch.all(out == out[:, :1])
    assert abs(per_sample.mean().item() - 1) < 0.05
    assert torch.equal(DropPath(0.25).eval()(x), x)


def test_subset_residual_expectation_equals_full_residual_and_plain_drop_path() -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 5, 4)
    rows: list[int] = []
    f = _branch(rows)
    residual = torch.tanh(x) * 2 + 1
    target = x + residual
    mean_subset = sum(drop_add_residual_stochastic_depth(x, f, 0.4) for _ in range(DRAWS)) / DRAWS
    mean_plain = sum(x + drop_path(torch.tanh(x) * 2 + 1, 0.4, True) for _ in range(DRAWS)) / DRAWS
    assert set(rows) == {4}  # int(8 * 0.6): the branch never saw the dropped samples
    _assert_unbiased(mean_subset, target, residual, keep=0.5)  # 4 of 8 kept, scaled by 2
    _assert_unbiased(mean_plain, target, residual, keep=0.6)
    torch.testing.assert_close(mean_subset, mean_plain, atol=0.3, rtol=0)
    one = drop_add_residual_stochastic_depth(x, f, 0.4)
    changed = (one != x).flatten(1).any(1)
    assert changed.sum() == 4  # untouched samples are exactly x


def test_packed_subset_expectation_with_real_attention() -> None:
    torch.manual_seed(0)
    block = Block(16, num_heads=2, qkv_bias=True, init_values=1.0).eval()
    xs = [torch.randn(2, 6, 16), torch.randn(4, 3, 16)]
    seqs = PackedSeqs.from_tensors(xs)
    x = seqs.pack(xs)
    tokens: list[int] = []

    def branch(t: torch.Tensor, s: PackedSeqs) -> torch.Tensor:
        tokens.append(t.shape[1])
        return block.attn_residual(t, s)

    with torch.no_grad():
        residual = block.attn_residual(x, seqs)
        mean = sum(drop_add_residual_packed(x, seqs, branch, 0.5) for _ in range(DRAWS // 4)) / (DRAWS // 4)
    assert set(tokens) == {1 * 6 + 2 * 3}
    stderr = residual.abs() / (DRAWS // 4) ** 0.5 + 1e-6
    assert ((mean - x - residual) / stderr).abs().max() < 5


def test_block_uses_subset_above_threshold_and_drop_path_below() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 5, 16)
    for rate, expected_rows in ((0.5, 5), (0.05, 10)):
        block = Block(16, num_heads=2, init_values=1.0, drop_path=rate).train()
        rows: list[int] = []
        block.mlp.register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[0]))
        block(x)
        assert rows == [expected_rows]


def test_eval_is_deterministic_and_undropped() -> None:
    torch.manual_seed(0)
    block = Block(16, num_heads=2, init_values=1.0, drop_path=0.5).eval()
    x = torch.randn(6, 5, 16)
    ref = x + block.attn_residual(x)
    ref = ref + block.ffn_residual(ref)
    torch.testing.assert_close(block(x), ref)
    torch.testing.assert_close(block(x), block(x))
    model = vit_test(img_size=28, drop_path_rate=0.4).eval()
    img = torch.randn(3, 3, 28, 28)
    assert torch.equal(model(img), model(img))


def test_drop_path_rates_follow_official_schedule() -> None:
    model = vit_test(depth=3, drop_path_rate=0.4)
    assert [round(b.sample_drop_ratio, 6) for b in model.blocks] == [0.0, 0.2, 0.4]
    uniform = vit_test(depth=3, drop_path_rate=0.4, drop_path_uniform=True)
    assert [b.sample_drop_ratio for b in uniform.blocks] == [0.4] * 3
