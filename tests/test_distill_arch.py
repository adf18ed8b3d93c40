"""model.ssl.distill_arch: all-patch iBOT masks, frozen teacher, student EMA, teacher-head checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.ssl.distill_arch import DistillMetaArch, all_patch_masks, teacher_modules
from model.ssl.meta_arch import build_ssl_modules
from model.ssl.schedules import Schedules
from test_meta_arch import B, G, P, make_batch, tiny_cfg

N_PATCHES = (G // P) ** 2  # 16 patch tokens per global crop
TEACHER_DIM, STUDENT_DIM = 48, 32


def teacher_cfg(**sections):
    cfg = tiny_cfg(student={"backbone_kwargs": {"embed_dim": TEACHER_DIM, "depth": 1, "num_heads": 2},
                            "drop_path_rate": 0.0})
    return cfg.with_updates(**sections) if sections else cfg


def trained_heads(cfg) -> tuple[nn.Module, dict]:
    """A teacher backbone and the state dicts of its heads (as an `lvd train` export holds them)."""
    torch.manual_seed(42)
    src = build_ssl_modules(cfg, teacher=True)
    return src["backbone"], {name: m.state_dict() for name, m in src.items() if name != "backbone"}


def make_teacher(cfg=None) -> nn.ModuleDict:
    cfg = cfg or teacher_cfg()
    backbone, heads = trained_heads(cfg)
    return teacher_modules(cfg, backbone, heads)


@pytest.fixture
def arch() -> DistillMetaArch:
    teacher = make_teacher()
    torch.manual_seed(0)
    return DistillMetaArch(tiny_cfg(), teacher)


def test_all_patch_masks() -> None:
    crops = torch.zeros(6, 3, 28, 21)  # 4 x 3 patches of 7 px
    masks, indices, weights = all_patch_masks(crops, patch_size=7)
    assert masks.shape == (6, 12) and masks.dtype == torch.bool and bool(masks.all())
    assert torch.equal(indices, torch.arange(72))
    assert weights.shape == (72,) and torch.allclose(weights, torch.full((72,), 1 / 12))
    assert float(weights.sum()) == pytest.approx(6.0)  # each image's patches weigh 1 in total, as in collate


def test_teacher_modules_loads_the_given_heads() -> None:
    cfg = teacher_cfg()
    backbone, heads = trained_heads(cfg)
    teacher = teacher_modules(cfg, backbone, heads)
    assert set(teacher.keys()) == {"backbone", "dino_head"} and teacher["backbone"] is backbone
    for k, v in heads["dino_head"].items():
        assert torch.equal(teacher["dino_head"].state_dict()[k], v), k
    assert not any(p.requires_grad for p in teacher.parameters())


def test_construction(arch: DistillMetaArch) -> None:
    assert arch.teacher["backbone"].embed_dim == TEACHER_DIM and arch.student["backbone"].embed_dim == STUDENT_DIM
    assert not arch.mask_student_inputs
    assert arch.student_ema.state_dict().keys() == arch.student.state_dict().keys()
    assert all(torch.equal(v, arch.student.state_dict()[k]) for k, v in arch.student_ema.state_dict().items())
    assert not any(p.requires_grad for p in arch.teacher.parameters())
    assert not any(p.requires_grad for p in arch.student_ema.parameters())
    arch.train()
    assert arch.student.training and not arch.teacher.training and not arch.student_ema.training
    opt_params = {id(p) for g in arch.make_optimizer().param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in arch.student.parameters()}  # only the student is optimised


def test_train_step_frozen_teacher_moving_student_and_ema(arch: DistillMetaArch) -> None:
    arch.train()
    opt = arch.make_optimizer()
    values = Schedules.from_config(arch.cfg).at(3)
    m = values.momentum
    assert 0.99 < m < 1.0
    teacher0 = {k: v.clone() for k, v in arch.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in arch.student.state_dict().items()}
    ema0 = {k: v.clone() for k, v in arch.student_ema.state_dict().items()}

    losses = arch.train_step(make_batch(), opt, values)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses["ibot"] > 0

    assert all(torch.equal(v, teacher0[k]) for k, v in arch.teacher.state_dict().items())
    assert all(p.grad is None for p in arch.teacher.parameters())
    student = arch.student.state_dict()
    assert not torch.equal(student["backbone.blocks.0.attn.qkv.weight"], student0["backbone.blocks.0.attn.qkv.weight"])

    # by hand, one parameter: ema = m * ema_old + (1 - m) * student_new
    key = "backbone.blocks.0.attn.qkv.weight"
    expected = m * ema0[key] + (1 - m) * student[key]
    torch.testing.assert_close(arch.student_ema.state_dict()[key], expected, rtol=0, atol=1e-7)
    assert not torch.equal(arch.student_ema.state_dict()[key], ema0[key])
    for name, p in arch.student_ema.named_parameters():  # and every other parameter
        torch.testing.assert_close(p.detach(), m * ema0[name] + (1 - m) * student[name], rtol=1e-5, atol=1e-7)


def test_ibot_on_every_patch_without_student_masking(arch: DistillMetaArch, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    backbone = arch.student["backbone"]
    original = backbone.forward_features_list

    def record(xs, masks):
        seen.append([m is not None for m in masks])
        return original(xs, masks)

    monkeypatch.setattr(backbone, "forward_features_list", record)
    for mask_probability in (0.5, 0.0):  # whatever masks the batch carries
        losses = arch.forward_backward(make_batch(mask_probability=mask_probability), teacher_temp=0.04)
        assert arch.last_stats["n_masked_patches"] == B * 2 * N_PATCHES == 128
        assert losses["ibot"] > 0
    assert seen == [[False, False], [False, False]]  # the student sees unmasked global crops
    assert backbone.mask_token.grad is None or float(backbone.mask_token.grad.abs().sum()) == 0.0


def test_missing_teacher_heads_are_clear_errors() -> None:
    cfg = teacher_cfg()
    backbone, heads = trained_heads(cfg)
    with pytest.raises(ValueError, match="trained DINO head"):
        DistillMetaArch(tiny_cfg(), nn.ModuleDict({"backbone": backbone}))
    with pytest.raises(ValueError, match="no teacher heads"):
        teacher_modules(cfg, backbone, None)
    sep = teacher_cfg(ibot={"separate_head": True})
    with pytest.raises(ValueError, match="has no 'ibot_head'"):
        teacher_modules(sep, backbone, heads)  # heads of a teacher trained without a separate iBOT head
    with pytest.raises(ValueError, match="teacher has no iBOT head"):
        DistillMetaArch(tiny_cfg(ibot={"separate_head": True}), make_teacher())


def test_dino_prototype_mismatch_is_a_clear_error() -> None:
    teacher = make_teacher(teacher_cfg(dino={"head_n_prototypes": 24}))
    with pytest.raises(ValueError, match="24 prototypes but the student config says 32"):
        DistillMetaArch(tiny_cfg(), teacher)


def test_ibot_prototype_mismatch_is_a_clear_error() -> None:
    teacher = make_teacher(teacher_cfg(ibot={"separate_head": True, "head_n_prototypes": 20}))
    with pytest.raises(ValueError, match="prototypes"):
        DistillMetaArch(tiny_cfg(ibot={"separate_head": True, "head_n_prototypes": 24}), teacher)
