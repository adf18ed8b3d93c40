"""KoLeoLoss: hand-computed points on the unit circle, batch size 1, duplicates."""

from __future__ import annotations

import math

import torch

from model.losses import KoLeoLoss


def test_three_points_on_circle_hand_computed() -> None:
    # angles 0, 60, 180 degrees on the unit circle: chord lengths 2 sin(delta / 2):
    #   |p0 p1| = 2 sin 30 = 1, |p1 p2| = 2 sin 60 = sqrt 3, |p0 p2| = 2
    # nearest-neighbour distances: p0 -> 1, p1 -> 1, p2 -> sqrt 3
    # loss = -(ln 1 + ln 1 + ln sqrt 3) / 3 = -ln 3 / 6 = -0.183102...
    pts = torch.tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2], [-1.0, 0.0]])
    value = KoLeoLoss()(pts * torch.tensor([[2.0], [0.5], [3.0]]))  # norms don't matter: L2-normalised
    assert abs(value.item() - (-math.log(3) / 6)) < 1e-6
    assert abs(-math.log(3) / 6 + 0.183102) < 1e-6


def test_three_points_quarter_circle() -> None:
    # angles 0, 90, 180: every nearest neighbour is at distance sqrt 2 -> loss = -ln sqrt 2 = -ln 2 / 2
    pts = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    assert abs(KoLeoLoss()(pts).item() + math.log(2) / 2) < 1e-6


def test_batch_of_one_is_zero_and_differentiable() -> None:
    x = torch.randn(1, 8, requires_grad=True)
    value = KoLeoLoss()(x)
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(x.grad, torch.zeros(1, 8))
    assert KoLeoLoss()(torch.randn(0, 8)).item() == 0.0


def test_two_antipodal_points() -> None:
    # distance 2 each: loss = -ln 2 (the official -1 diagonal fill would tie with the antipode)
    assert abs(KoLeoLoss()(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])).item() + math.log(2)) < 1e-6


def test_duplicates_are_finite() -> None:
    # p0 = p1 (distance 0 -> -ln(eps) = 18.42...), p2 orthogonal at sqrt 2 from both
    # loss = (2 * -ln(1e-8) - ln sqrt 2) / 3
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    value = KoLeoLoss()(x)
    expected = (2 * -math.log(1e-8) - 0.5 * math.log(2)) / 3
    assert math.isfinite(value.item()) and abs(value.item() - expected) < 1e-4
    value.backward()
    assert torch.isfinite(x.grad).all()


def test_spread_points_have_lower_loss() -> None:
    g = torch.Generator().manual_seed(0)
    clustered = torch.tensor([1.0, 0, 0, 0]) + 0.01 * torch.randn(16, 4, generator=g)
    spread = torch.randn(16, 4, generator=g)
    assert KoLeoLoss()(spread) < KoLeoLoss()(clustered)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KoLeoLoss()(spread.bfloat16()).dtype == torch.float32
