"""CosineScheduler exact values and the config-built schedule bundle (incl. resume)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from model.ssl.config import SSLConfig
from model.ssl.schedules import CosineScheduler, Schedules, apply_optim_scheduler, scaled_lr


def test_cosine_scheduler_exact_values():
    s = CosineScheduler(base_value=1.0, final_value=0.0, total_iters=10, warmup_iters=2, start_warmup_value=0.5,
                        freeze_iters=1)
    cos = [0.5 * (1 + math.cos(math.pi * i / 7)) for i in range(7)]
    expected = [0.0, 0.5, 1.0] + cos
    assert len(s) == 10
    np.testing.assert_allclose([s[i] for i in range(10)], expected, rtol=0, atol=1e-15)
    assert s[3] == 1.0  # cosine starts at base_value
    assert s[10] == 0.0 and s[10_000] == 0.0  # past the end: final value
    with pytest.raises(IndexError):
        s[-1]


def test_cosine_scheduler_constant_warmup_only():
    # the teacher-temperature shape: warm-up over the whole range, then constant
    s = CosineScheduler(0.07, 0.07, total_iters=4, warmup_iters=4, start_warmup_value=0.04)
    np.testing.assert_allclose([s[i] for i in range(6)], [0.04, 0.05, 0.06, 0.07, 0.07, 0.07], atol=1e-15)
    with pytest.raises(ValueError):
        CosineScheduler(1.0, 0.0, total_iters=3, warmup_iters=2, freeze_iters=2)


def _cfg(**optim) -> SSLConfig:
    return SSLConfig().with_updates(train={"official_epoch_length": 10, "batch_size_per_gpu": 16},
                                    optim={"epochs": 40, **optim})


def test_schedules_from_config_dinov2_defaults():
    cfg = _cfg()
    s = Schedules.from_config(cfg)
    ep = 10
    assert s.total_iters == 400
    # lr: sqrt scaling wrt 1024, warm-up 10 epochs from 0, then cosine to min_lr
    base = 0.004 * math.sqrt(16 / 1024)
    assert s.base_lr == pytest.approx(base)
    assert s.at(0).lr == 0.0
    assert s.at(10 * ep - 1).lr == pytest.approx(base)
    assert s.at(10 * ep).lr == pytest.approx(base)
    assert s.at(400).lr == pytest.approx(1e-6)
    # wd cosine 0.04 -> 0.4, momentum cosine 0.992 -> 1
    assert s.at(0).wd == pytest.approx(0.04) and s.at(400).wd == pytest.approx(0.4)
    assert s.at(200).wd == pytest.approx(0.22)
    assert s.at(0).momentum == pytest.approx(0.992) and s.at(400).momentum == 1.0
    assert s.at(200).momentum == pytest.approx(0.996)
    # teacher temp: linear 0.04 -> 0.07 over 30 epochs, then 0.07
    assert s.at(0).teacher_temp == pytest.approx(0.04)
    assert s.at(30 * ep - 1).teacher_temp == pytest.approx(0.07)
    assert s.at(150).teacher_temp == pytest.approx(0.04 + 0.03 * 150 / 299)
    assert s.at(399).teacher_temp == 0.07
    # last layer: lr 0 during the first epoch, then the lr schedule
    assert s.freeze_last_layer_iters == ep
    assert all(s.at(i).last_layer_lr == 0.0 for i in range(ep))
    assert s.at(ep).last_layer_lr == s.at(ep).lr > 0


def test_schedules_resume_identical_values():
    cfg = _cfg(warmup_epochs=3)
    s = Schedules.from_config(cfg, world_size=4)
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    r = Schedules.from_state_dict(state)
    for it in (0, 1, 17, 29, 30, 31, 123, 399, 400, 1000):
        assert r.at(it) == s.at(it)
    assert r.base_lr == s.base_lr == pytest.approx(scaled_lr(0.004, 64, "sqrt_wrt_1024"))


def test_explicit_lr_and_scaling_rules():
    assert scaled_lr(0.004, 256, "linear_wrt_256") == 0.004
    assert scaled_lr(0.004, 4096, "sqrt_wrt_1024") == pytest.approx(0.008)
    s = Schedules.from_config(_cfg(lr=0.5, warmup_epochs=0))
    assert s.at(0).lr == 0.5


def test_apply_optim_scheduler_sets_group_values():
    import torch

    p1, p2 = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([
        {"params": [p1], "lr_multiplier": 0.5, "wd_multiplier": 0.0, "is_last_layer": False},
        {"params": [p2], "lr_multiplier": 1.0, "wd_multiplier": 1.0, "is_last_layer": True},
    ])
    s = Schedules.from_config(_cfg(lr=0.5, warmup_epochs=0))
    apply_optim_scheduler(opt, s.at(0))
    assert opt.param_groups[0]["lr"] == 0.25 and opt.param_groups[0]["weight_decay"] == 0.0
    assert opt.param_groups[1]["lr"] == 0.0 and opt.param_groups[1]["weight_decay"] == pytest.approx(0.04)


def test_config_forbids_unknown_keys():
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        SSLConfig.model_validate({"optim": {"epochz": 3}})
    with pytest.raises(ValidationError):
        SSLConfig.model_validate({"nope": {}})
    cfg = SSLConfig()
    assert cfg.crops.blur_probs == (1.0, 0.1, 0.5)
    assert cfg.optim.layerwise_decay == 0.9 and cfg.optim.patch_embed_lr_mult == 0.2 and cfg.optim.clip_grad == 3.0
    assert cfg.dino.head_n_prototypes == 65536 and cfg.dino.koleo_loss_weight == 0.1
    assert cfg.train.official_epoch_length == 1250
