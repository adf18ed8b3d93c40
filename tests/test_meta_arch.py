"""SSLMetaArch: teacher init, packed student forward, losses, freezing, clipping, EMA, autocast."""
from __future__ import annotations

import random

import pytest
import torch

from model.data.collate import collate_data_and_cast
from model.data.masking import MaskingGenerator
from model.ssl.config import SSLConfig
from model.ssl.meta_arch import SSLMetaArch
from model.ssl.schedules import Schedules

G, L, P = 28, 14, 7  # global / local crop size, patch size -> 16 and 4 tokens
N_LOCAL, B = 3, 4


def tiny_cfg(**sections) -> SSLConfig:
    base = dict(
        student={"arch": "vit_test", "patch_size": P, "drop_path_rate": 0.2, "layerscale": 0.1,
                 "backbone_kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}},
        crops={"global_crops_size": G, "local_crops_size": L, "local_crops_number": N_LOCAL},
        dino={"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        ibot={"head_n_prototypes": 32, "head_hidden_dim": 32, "head_bottleneck_dim": 16},
        train={"batch_size_per_gpu": B, "official_epoch_length": 2},
        optim={"epochs": 4, "warmup_epochs": 1, "lr": 1e-3},
        compute={"autocast_dtype": "fp32"},
    )
    cfg = SSLConfig()
    cfg = cfg.with_updates(**base)
    return cfg.with_updates(**sections) if sections else cfg


def make_batch(n_local: int = N_LOCAL, seed: int = 0, mask_probability: float = 0.5) -> dict:
    g = torch.Generator().manual_seed(seed)
    samples = [({"global_crops": [torch.randn(3, G, G, generator=g) for _ in range(2)],
                 "local_crops": [torch.randn(3, L, L, generator=g) for _ in range(n_local)]}, 0) for _ in range(B)]
    side = G // P
    return collate_data_and_cast(samples, (0.1, 0.5), mask_probability, n_tokens=side * side,
                                 mask_generator=MaskingGenerator((side, side), max_num_patches=0.5 * side * side),
                                 rng=random.Random(seed))


@pytest.fixture
def arch() -> SSLMetaArch:
    torch.manual_seed(0)
    return SSLMetaArch(tiny_cfg())


def test_teacher_initialised_from_student_without_grad(arch):
    s, t = arch.student.state_dict(), arch.teacher.state_dict()
    assert s.keys() == t.keys() and set(arch.student.keys()) == {"backbone", "dino_head"}
    assert all(torch.equal(s[k], t[k]) for k in s)
    assert not any(p.requires_grad for p in arch.teacher.parameters())
    assert all(blk.sample_drop_ratio == 0.0 for blk in arch.teacher["backbone"].blocks)
    assert all(blk.sample_drop_ratio == 0.2 for blk in arch.student["backbone"].blocks)
    arch.train()
    assert not arch.teacher.training and arch.student.training


def test_forward_backward_terms_and_grads(arch):
    losses = arch.forward_backward(make_batch(), teacher_temp=0.04)
    assert set(losses) == {"total", "dino", "ibot", "koleo"}
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert losses["total"] == pytest.approx(losses["dino"] + losses["ibot"] + 0.1 * losses["koleo"], rel=1e-5)
    bb = arch.student["backbone"]
    assert bb.blocks[0].attn.qkv.weight.grad is not None and bb.mask_token.grad is not None
    assert bb.mask_token.grad.abs().sum() > 0  # masked patches went through the student
    assert arch.student["dino_head"].last_layer.weight_v.grad is not None
    assert all(p.grad is None for p in arch.teacher.parameters())
    stats = arch.last_stats
    assert 0 < stats["teacher_entropy"] <= stats["log_k"] + 1e-4


def test_one_packed_student_forward_teacher_on_globals_only(arch, monkeypatch):
    calls = {"student_list": [], "student_single": 0, "teacher": [], "teacher_list": 0}
    sb, tb = arch.student["backbone"], arch.teacher["backbone"]
    s_list, s_single, t_single = sb.forward_features_list, sb.forward_features, tb.forward_features

    def student_list(xs, masks):
        calls["student_list"].append(([tuple(x.shape) for x in xs], [m is not None for m in masks]))
        return s_list(xs, masks)

    def student_single(*a, **k):
        calls["student_single"] += 1
        return s_single(*a, **k)

    def teacher_single(x, masks=None):
        calls["teacher"].append((tuple(x.shape), masks))
        return t_single(x, masks)

    def teacher_list(*a, **k):
        calls["teacher_list"] += 1
        raise AssertionError("teacher must not see local crops")

    monkeypatch.setattr(sb, "forward_features_list", student_list)
    monkeypatch.setattr(sb, "forward_features", student_single)
    monkeypatch.setattr(tb, "forward_features", teacher_single)
    monkeypatch.setattr(tb, "forward_features_list", teacher_list)
    arch.forward_backward(make_batch(), teacher_temp=0.04)
    assert calls["student_list"] == [([(2 * B, 3, G, G), (N_LOCAL * B, 3, L, L)], [True, False])]
    assert calls["student_single"] == 0 and calls["teacher_list"] == 0
    assert calls["teacher"] == [((2 * B, 3, G, G), None)]


def test_train_step_freezes_last_layer_then_updates(arch):
    opt = arch.make_optimizer()
    sched = Schedules.from_config(arch.cfg)
    assert sched.freeze_last_layer_iters == arch.cfg.freeze_last_layer_iters == 2
    last = arch.student["dino_head"].last_layer.weight_v
    mlp = arch.student["dino_head"].mlp[0].weight
    w0, m0 = last.detach().clone(), mlp.detach().clone()
    for it in range(2):  # lr warm-up starts at 0: step 1 moves the weights
        arch.train_step(make_batch(seed=it), opt, sched.at(it))
    assert torch.equal(last, w0), "last layer must stay frozen during the first epoch"
    assert not torch.equal(mlp, m0)
    arch.train_step(make_batch(seed=2), opt, sched.at(2))
    assert not torch.equal(last, w0)


def test_train_step_ema_teacher(arch):
    opt = arch.make_optimizer()
    sched = Schedules.from_config(arch.cfg)
    t_before = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    values = sched.at(3)
    arch.train_step(make_batch(), opt, values)
    m = values.momentum
    s_after = arch.student.state_dict()
    names = dict(arch.teacher.named_parameters())
    for k in names:
        torch.testing.assert_close(arch.teacher.state_dict()[k], m * t_before[k] + (1 - m) * s_after[k], rtol=1e-5, atol=1e-7)
    changed = [k for k in names if not torch.equal(arch.teacher.state_dict()[k], t_before[k])]
    assert changed


def test_gradient_clipping_per_module(arch):
    arch.forward_backward(make_batch(), teacher_temp=0.04)
    before = arch.clip_gradients(1e-3)
    assert set(before) == {"backbone", "dino_head"} and all(v > 1e-3 for v in before.values())
    for name, module in arch.student.items():
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters() if p.grad is not None]))
        assert norm <= 1e-3 * 1.0001, name


def test_param_groups_of_meta_arch(arch):
    groups = arch.get_params_groups()
    names = {n: g for g in groups for n in g["names"]}
    assert names["dino_head.last_layer.weight_v"]["is_last_layer"]
    assert names["backbone.patch_embed.proj.weight"]["lr_multiplier"] == pytest.approx(0.9**3 * 0.2)
    assert names["backbone.blocks.1.attn.qkv.weight"]["lr_multiplier"] == pytest.approx(0.9)
    assert names["dino_head.mlp.0.weight"]["lr_multiplier"] == 1.0
    n_params = sum(1 for p in arch.student.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups) == n_params


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    arch = SSLMetaArch(tiny_cfg(compute={"autocast_dtype": "bf16"}))
    dtypes = []
    arch.student["backbone"].blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    losses = arch.forward_backward(make_batch(), teacher_temp=0.04)
    assert torch.bfloat16 in dtypes
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert arch.student["backbone"].blocks[0].attn.qkv.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("variant", ["sinkhorn", "separate_head", "no_locals", "no_masks"])
def test_variants(variant):
    torch.manual_seed(0)
    sections: dict = {}
    n_local, mask_p = N_LOCAL, 0.5
    if variant == "sinkhorn":
        sections["train"] = {"centering": "sinkhorn_knopp"}
    elif variant == "separate_head":
        sections["ibot"] = {"separate_head": True, "head_n_prototypes": 24}
    elif variant == "no_locals":
        sections["crops"] = {"local_crops_number": 0}
        n_local = 0
    else:
        mask_p = 0.0
    arch = SSLMetaArch(tiny_cfg(**sections))
    opt = arch.make_optimizer()
    losses = arch.train_step(make_batch(n_local=n_local, mask_probability=mask_p), opt, Schedules(arch.cfg).at(3))
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    if variant == "separate_head":
        assert "ibot_head" in arch.student and "ibot_head" in arch.teacher
        assert arch.student["ibot_head"].mlp[0].weight.grad is not None
        assert arch.ibot_patch_loss.patch_out_dim == 24
    if variant == "no_masks":
        assert losses["ibot"] == 0.0
