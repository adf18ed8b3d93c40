"""Declarative loss composition and the DINO / iBOT / KoLeo terms on hand-computed cases."""
from __future__ import annotations

import math

import pytest
import torch

from model.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss
from model.ssl.loss_terms import (
    DinoCrossViewTerm,
    IbotMaskedPatchTerm,
    KoLeoTerm,
    LossComposition,
    LossTerm,
    default_loss_terms,
)

L3 = math.log(3.0)


def _outputs() -> dict:
    return {
        "n_global_crops": 2,
        "n_local_crops": 1,
        # B = 1 image, K = 2 prototypes; crop-major rows
        "student_global_cls_head": torch.tensor([[L3, 0.0], [0.0, 0.0]]),  # softmax: [3/4, 1/4], [1/2, 1/2]
        "student_local_cls_head": torch.tensor([[0.0, L3]]),  # [1/4, 3/4]
        "teacher_dino_targets": torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]]),  # t1, t2 (same view order)
        # iBOT: 2 global crops x 2 patches, masks [[1, 1], [1, 0]] -> weights 1/2, 1/2, 1
        "masks": torch.tensor([[True, True], [True, False]]),
        "masks_weight": torch.tensor([0.5, 0.5, 1.0]),
        "n_masked_patches": 3,
        "student_masked_patch_head": torch.tensor([[L3, 0.0], [0.0, 0.0], [0.0, L3]]),
        "teacher_masked_patch_targets": torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]]),
        # KoLeo: B = 2 per global crop; crop 1 orthogonal pair, crop 2 antipodal pair
        "student_global_cls": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]]),
    }


def test_dino_term_pairs_views_and_normalises():
    term = DinoCrossViewTerm(DINOLoss(2, student_temp=1.0))
    # pairs (g1,t2) (g2,t1) (l,t1) (l,t2); the same-view pairs (g1,t1) (g2,t2) are excluded
    expected = (-math.log(3 / 4) - math.log(1 / 2) - math.log(3 / 4) - math.log(1 / 4)) / 4
    assert term(_outputs()).item() == pytest.approx(expected, rel=1e-6)


def test_dino_term_without_local_crops():
    out = _outputs()
    out.update(n_local_crops=0, student_local_cls_head=torch.zeros(0, 2))
    expected = (-math.log(3 / 4) - math.log(1 / 2)) / 2
    assert DinoCrossViewTerm(DINOLoss(2, student_temp=1.0))(out).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_term_weights_patches_per_image():
    term = IbotMaskedPatchTerm(iBOTPatchLoss(2, student_temp=1.0))
    expected = (0.5 * -math.log(3 / 4) + 0.5 * math.log(2) + 1.0 * math.log(4)) / 2
    assert term(_outputs()).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_term_stays_within_each_global_crop():
    term = KoLeoTerm(KoLeoLoss())
    expected = -math.log(math.sqrt(2)) - math.log(2.0)
    assert term(_outputs()).item() == pytest.approx(expected, rel=1e-5)


def test_composition_weighted_sum_and_values():
    terms = default_loss_terms(DINOLoss(2, 1.0), iBOTPatchLoss(2, 1.0), KoLeoLoss(), koleo_weight=0.1)
    comp = LossComposition(terms)
    assert comp.names == ["dino", "ibot", "koleo"]
    assert [t.weight for t in terms] == [1.0, 1.0, 0.1]
    total, values = comp.compute(_outputs())
    assert set(values) == {"dino", "ibot", "koleo"}
    expected = values["dino"] + values["ibot"] + 0.1 * values["koleo"]
    assert total.item() == pytest.approx(expected.item(), rel=1e-6)


def test_composition_is_just_a_list():
    calls = []

    def const(v):
        def f(outputs):
            calls.append(v)
            return torch.tensor(v)
        return f

    comp = LossComposition([LossTerm("a", 2.0, const(1.5)), LossTerm("b", 0.0, const(100.0)), LossTerm("c", -1.0, const(0.5))])
    total, values = comp.compute({})
    assert total.item() == 2.5 and set(values) == {"a", "c"} and calls == [1.5, 0.5]  # zero weight: not computed
    with pytest.raises(ValueError):
        LossComposition([LossTerm("a", 1.0, const(1.0)), LossTerm("a", 1.0, const(1.0))])
    with pytest.raises(ValueError):
        LossComposition([LossTerm("a", 0.0, const(1.0))]).compute({})
    assert "a×2.0" in repr(comp)
