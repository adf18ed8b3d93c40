"""EMA teacher update arithmetic."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.ssl.ema import EMATeacher, ema_update


def _pair():
    s, t = nn.Linear(3, 2), nn.Linear(3, 2)
    s.register_buffer("stat", torch.full((1,), 5.0))
    t.register_buffer("stat", torch.full((1,), 1.0))
    with torch.no_grad():
        s.weight.fill_(8.0), s.bias.fill_(-4.0)
        t.weight.fill_(4.0), t.bias.fill_(0.0)
    return s, t


def test_exact_arithmetic():
    s, t = _pair()
    ema_update(s, t, momentum=0.75)
    # 0.75 * 4 + 0.25 * 8 = 5 ; 0.75 * 0 + 0.25 * (-4) = -1 (dyadic: exact in float32)
    assert torch.equal(t.weight, torch.full((2, 3), 5.0))
    assert torch.equal(t.bias, torch.full((2,), -1.0))
    assert torch.equal(s.weight, torch.full((2, 3), 8.0))  # student untouched
    assert t.stat.item() == 1.0  # buffers are not averaged
    ema_update(s, t, momentum=1.0)
    assert torch.equal(t.weight, torch.full((2, 3), 5.0))
    EMATeacher(s, t).update(0.0)
    assert torch.equal(t.weight, s.weight) and torch.equal(t.bias, s.bias)


def test_random_values_match_formula():
    torch.manual_seed(0)
    s, t = nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7)), nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7))
    before = {k: v.clone() for k, v in t.state_dict().items()}
    ema_update(s, t, 0.992)
    for k, v in t.state_dict().items():
        torch.testing.assert_close(v, 0.992 * before[k] + 0.008 * s.state_dict()[k], rtol=1e-6, atol=1e-7)


def test_no_autograd_and_mismatch():
    s, t = _pair()
    t.requires_grad_(False)
    ema_update(s, t, 0.5)
    assert t.weight.grad_fn is None and not t.weight.requires_grad
    with pytest.raises(ValueError):
        ema_update(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2)), 0.5)
