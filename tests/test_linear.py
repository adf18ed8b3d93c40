"""Linear probe: accuracy on separable / random data, lr chosen on train only, determinism."""
from __future__ import annotations

import pytest
import torch

import model.eval.linear as linear
from model.eval.linear import ProbeConfig, linear_probe, select_hyperparams, stratified_split, train_linear_grid

FAST = ProbeConfig(lrs=(0.01, 0.1, 1.0), weight_decays=(0.0,), epochs=20, min_steps=100)


def blobs(n_per_class: int, n_classes: int = 4, dim: int = 16, seed: int = 0, spread: float = 0.3):
    """Gaussian clusters around well-separated random centres: linearly separable."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, dim, generator=torch.Generator().manual_seed(123)) * 3
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    return feats, labels


def test_separable_features_reach_full_accuracy():
    xtr, ytr = blobs(40)
    xva, yva = blobs(20, seed=1)
    res = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    assert res["top1"] == 1.0 and res["train_top1"] == 1.0
    assert "top5" not in res  # 4 classes
    assert res["lr"] in FAST.lrs and res["weight_decay"] == 0.0
    assert len(res["selection"]) == 3


def test_random_labels_stay_at_chance():
    g = torch.Generator().manual_seed(0)
    xtr, xva = torch.randn(400, 32, generator=g), torch.randn(400, 32, generator=g)
    ytr, yva = torch.randint(0, 4, (400,), generator=g), torch.randint(0, 4, (400,), generator=g)
    res = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    assert 0.15 < res["top1"] < 0.35  # chance is 0.25 (400 samples: std ≈ 0.02)


def test_top5_with_many_classes():
    xtr, ytr = blobs(10, n_classes=6)
    xva, yva = blobs(5, n_classes=6, seed=1)
    res = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    assert res["top5"] == 1.0 and res["top1"] == 1.0


def test_deterministic_given_seed():
    xtr, ytr = blobs(15, spread=3.0)
    xva, yva = blobs(10, seed=1, spread=3.0)
    a = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    b = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    assert a == b
    p1 = train_linear_grid(xtr, ytr, 4, FAST.grid, FAST)
    p2 = train_linear_grid(xtr, ytr, 4, FAST.grid, FAST)
    for u, v in zip(p1, p2):
        assert torch.equal(u.weight, v.weight) and torch.equal(u.bias, v.bias)


def test_selection_never_sees_val(monkeypatch: pytest.MonkeyPatch):
    xtr, ytr = blobs(20, spread=2.0)
    xva, yva = blobs(10, seed=1, spread=2.0)
    xva = xva + 1000.0  # no val row can pass for a train row
    seen: list[torch.Tensor] = []
    real_grid, real_select = linear.train_linear_grid, linear.select_hyperparams

    def spy_grid(feats, labels, num_classes, grid, cfg):
        seen.append(feats)
        return real_grid(feats, labels, num_classes, grid, cfg)

    def spy_select(feats, labels, num_classes, cfg):
        assert feats is xtr and labels is ytr
        return real_select(feats, labels, num_classes, cfg)

    monkeypatch.setattr(linear, "train_linear_grid", spy_grid)
    monkeypatch.setattr(linear, "select_hyperparams", spy_select)
    res = linear_probe(xtr, ytr, xva, yva, cfg=FAST)
    assert len(seen) == 2  # the grid on the fit split, then the chosen point on all of train
    assert len(seen[0]) < len(xtr) and torch.equal(seen[1], xtr)
    for feats in seen:
        assert feats.abs().max() < 500  # every fitted row is a train row
    # the choice does not depend on the val set: other val labels/features give the same choice
    other = linear_probe(xtr, ytr, -xva, yva.flip(0), cfg=FAST)
    chosen = ("lr", "weight_decay", "selection")
    assert [other[key] for key in chosen] == [res[key] for key in chosen]


def test_selection_prefers_a_working_lr():
    xtr, ytr = blobs(20)
    cfg = ProbeConfig(lrs=(1e-7, 0.1), weight_decays=(0.0,), epochs=5, min_steps=30)
    (lr, wd), table = select_hyperparams(xtr, ytr, 4, cfg)
    assert (lr, wd) == (0.1, 0.0)
    assert [row["lr"] for row in table] == [1e-7, 0.1]
    assert table[1]["holdout_top1"] == 1.0
    # a single grid point needs no selection
    single = ProbeConfig(lrs=(0.1,), weight_decays=(0.0,))
    assert select_hyperparams(xtr, ytr, 4, single) == ((0.1, 0.0), [])


def test_stratified_split():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    fit, hold = stratified_split(labels, 0.2, seed=0)
    assert sorted(fit.tolist() + hold.tolist()) == list(range(16))
    assert set(fit.tolist()).isdisjoint(hold.tolist())
    assert (labels[hold] == 0).sum() == 2 and (labels[hold] == 1).sum() == 1
    assert 15 in fit.tolist()  # a class of one stays in the fit part
    assert torch.equal(stratified_split(labels, 0.2, seed=0)[1], hold)


def test_errors():
    with pytest.raises(ValueError):
        ProbeConfig(lrs=())
    with pytest.raises(ValueError):
        ProbeConfig(holdout_fraction=1.0)
    x, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="too few"):
        linear_probe(x, y, x, y, cfg=FAST)  # one image per class: nothing to hold out
    with pytest.raises(ValueError, match="same dimension"):
        linear_probe(x, y, torch.randn(3, 5), y, cfg=FAST)
