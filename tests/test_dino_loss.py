"""DINOLoss: hand-computed multi-crop case, official pair averaging, centring modes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.losses import DINOLoss

LN3 = math.log(3.0)


def test_hand_computed_two_globals_one_local() -> None:
    # K = 2, B = 1, student_temp = 0.1, so student logits 0.1 * z give log_softmax(z):
    #   student global 1: z = [ln 3, 0]  -> p = [3/4, 1/4]  -> log p = [ln 3/4, ln 1/4]
    #   student global 2: z = [0, 0]     -> p = [1/2, 1/2]
    #   student local  1: z = [0, ln 3]  -> p = [1/4, 3/4]
    #   teacher global 1 targets [1, 0], teacher global 2 targets [1/2, 1/2]
    # pairs (same view excluded):
    #   g1 vs t2: -(1/2 ln 3/4 + 1/2 ln 1/4) = 1/2 ln(16/3)
    #   g2 vs t1: -ln 1/2 = ln 2
    #   l1 vs t1: -ln 1/4 = ln 4
    #   l1 vs t2: -(1/2 ln 1/4 + 1/2 ln 3/4) = 1/2 ln(16/3)
    # mean over the 4 pairs: (ln(16/3) + ln 2 + ln 4) / 4 = ln(128/3) / 4 = 0.938355...
    loss = DINOLoss(out_dim=2, student_temp=0.1)
    student_global = 0.1 * torch.tensor([[[LN3, 0.0]], [[0.0, 0.0]]])
    student_local = 0.1 * torch.tensor([[[0.0, LN3]]])
    teacher = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]])
    value = loss(student_global, teacher, student_local)
    assert abs(value.item() - math.log(128 / 3) / 4) < 1e-6
    assert abs(math.log(128 / 3) / 4 - 0.938355) < 1e-6


def test_hand_computed_globals_only_and_batch_mean() -> None:
    # globals only: 2 pairs (g1 vs t2, g2 vs t1). Sample a as above: 1/2 ln(16/3) and ln 2.
    # sample b: student z = [0, 0] for both crops, targets [0, 1] and [1, 0]: ln 2 for both pairs.
    # each pair is a mean over the batch: pair 1 = (1/2 ln(16/3) + ln 2) / 2, pair 2 = (ln 2 + ln 2) / 2
    # total / 2 pairs = (1/2 ln(16/3) + 3 ln 2) / 4
    loss = DINOLoss(out_dim=2)
    sg = 0.1 * torch.tensor([[[LN3, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.5], [1.0, 0.0]]])
    expected = (0.5 * math.log(16 / 3) + 3 * math.log(2)) / 4
    assert abs(loss(sg, teacher).item() - expected) < 1e-6


def _reference_loop(sg, t, sl, temp):
    """Literal loop: every (student crop, teacher global crop) pair but same views, batch mean, pair mean."""
    terms = []
    students = [(i, s) for i, s in enumerate(sg)] + [(None, s) for s in sl]
    for i, s in students:
        for j, tj in enumerate(t):
            if i == j:
                continue
            terms.append(-(tj * F.log_softmax(s / temp, dim=-1)).sum(-1).mean())
    return torch.stack(terms).mean()


def _reference_official(sg, t, sl, temp):
    """The official composition: chunked local loss + the reversed-teacher global loss, / n_terms."""
    n_g, n_l = sg.shape[0], sl.shape[0]
    n_terms = (n_g - 1) * n_g + max(n_l * n_g, 1)

    def official_forward(student_list, teacher_list):
        total = 0
        for s in student_list:
            lsm = F.log_softmax(s / temp, dim=-1)
            for tt in teacher_list:
                total -= torch.sum(tt * lsm, dim=-1).mean()
        return total

    local = official_forward(list(sl), list(t)) / n_terms
    glob = official_forward([sg.flatten(0, 1)], [torch.cat([t[1], t[0]])]) * 2 / n_terms
    return local + glob


def test_matches_reference_loop_and_official_composition() -> None:
    g = torch.Generator().manual_seed(0)
    B, K = 3, 7
    sg = torch.randn(2, B, K, generator=g)
    sl = torch.randn(4, B, K, generator=g)
    t = torch.softmax(torch.randn(2, B, K, generator=g) / 0.04, dim=-1)
    value = DINOLoss(K)(sg, t, sl)
    assert torch.allclose(value, _reference_loop(sg, t, sl, 0.1), atol=1e-6)
    assert torch.allclose(value, _reference_official(sg, t, sl, 0.1), atol=1e-6)
    # more than two global crops work too (the loop is the definition)
    sg3 = torch.randn(3, B, K, generator=g)
    t3 = torch.softmax(torch.randn(3, B, K, generator=g), dim=-1)
    assert torch.allclose(DINOLoss(K)(sg3, t3, sl), _reference_loop(sg3, t3, sl, 0.1), atol=1e-6)


def test_gradients_flow_to_student_only() -> None:
    sg = torch.randn(2, 4, 5, requires_grad=True)
    sl = torch.randn(3, 4, 5, requires_grad=True)
    t = torch.softmax(torch.randn(2, 4, 5), dim=-1)
    DINOLoss(5)(sg, t, sl).backward()
    assert sg.grad is not None and sl.grad is not None and torch.isfinite(sg.grad).all()


def test_needs_a_pair() -> None:
    with pytest.raises(ValueError):
        DINOLoss(3)(torch.randn(1, 2, 3), torch.rand(1, 2, 3))


def test_both_centring_modes() -> None:
    loss = DINOLoss(out_dim=2, center_momentum=0.9)
    teacher_logits = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    # EMA: first call uses the zero centre, then the centre moves to 0.1 * mean = [0.2, 0.4]
    p = loss.softmax_center_teacher(teacher_logits, teacher_temp=1.0)
    assert torch.allclose(p, torch.softmax(teacher_logits, dim=-1))
    loss.update_center(teacher_logits)
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.4]]))
    p = loss.softmax_center_teacher(teacher_logits, teacher_temp=1.0)
    assert torch.allclose(p, torch.softmax(teacher_logits - torch.tensor([0.2, 0.4]), dim=-1))
    assert list(loss.state_dict()) == ["centering.center"]
    # Sinkhorn-Knopp, hand case exp(L/T) = [[1,1],[1,1],[1,4]] after one iteration (see test_centering)
    T = 0.5
    q = loss.sinkhorn_knopp_teacher(T * torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 4.0]]).log(), T, n_iterations=1)
    assert torch.allclose(q, torch.tensor([[2 / 3, 1 / 3], [2 / 3, 1 / 3], [1 / 3, 2 / 3]]), atol=1e-6)
