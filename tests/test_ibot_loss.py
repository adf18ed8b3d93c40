"""iBOTPatchLoss: hand-computed masked-patch loss with the official per-image weighting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.losses import iBOTPatchLoss, masks_weight_from_masks

LN3 = math.log(3.0)

# 3 images x 2 patches; image 0 masks both patches, image 1 masks patch 1, image 2 masks nothing
MASKS = torch.tensor([[True, True], [False, True], [False, False]])
# the 3 masked patches in row-major order, K = 2, student_temp = 0.1 (logits 0.1 * z):
#   a (img 0, patch 0): z = [0, 0]     vs target [1, 0]     CE = -ln 1/2                  = ln 2
#   b (img 0, patch 1): z = [ln 3, 0]  vs target [0, 1]     CE = -ln 1/4                  = ln 4
#   c (img 1, patch 1): z = [0, ln 3]  vs target [1/2, 1/2] CE = -(ln 1/4 + ln 3/4) / 2  = 1/2 ln(16/3)
# weights 1 / masked patches of the image: a, b -> 1/2, c -> 1; divided by the 3 images:
#   (1/2 ln 2 + 1/2 ln 4 + 1/2 ln(16/3)) / 3 = ln(128/3) / 6 = 0.625570...
EXPECTED = math.log(128 / 3) / 6
STUDENT_MASKED = 0.1 * torch.tensor([[0.0, 0.0], [LN3, 0.0], [0.0, LN3]])
TEACHER_MASKED = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])


def test_hand_computed_forward_masked() -> None:
    assert abs(EXPECTED - 0.625570) < 1e-6
    loss = iBOTPatchLoss(patch_out_dim=2, student_temp=0.1)
    assert torch.allclose(masks_weight_from_masks(MASKS), torch.tensor([0.5, 0.5, 1.0]))
    value = loss.forward_masked(STUDENT_MASKED, TEACHER_MASKED, MASKS, n_masked_patches=3)
    assert abs(value.item() - EXPECTED) < 1e-6
    # explicit weights (as produced by the collate function) give the same
    value = loss.forward_masked(STUDENT_MASKED, TEACHER_MASKED, MASKS, masks_weight=torch.tensor([0.5, 0.5, 1.0]))
    assert abs(value.item() - EXPECTED) < 1e-6


def test_upperbound_padding_is_ignored() -> None:
    # the training step fills buffers of `upperbound` rows; rows past n_masked_patches are garbage
    loss = iBOTPatchLoss(patch_out_dim=2)
    s = torch.cat([STUDENT_MASKED, torch.randn(4, 2)])
    t = torch.cat([TEACHER_MASKED, torch.rand(4, 2)])
    value = loss.forward_masked(s, t, MASKS, n_masked_patches=torch.tensor([3]), masks_weight=torch.tensor([0.5, 0.5, 1.0]))
    assert abs(value.item() - EXPECTED) < 1e-6


def test_dense_forward_agrees() -> None:
    # dense [B, N, K] tensors; unmasked positions hold arbitrary values and must not matter
    g = torch.Generator().manual_seed(0)
    s = torch.randn(3, 2, 2, generator=g)
    t = torch.softmax(torch.randn(3, 2, 2, generator=g), dim=-1)
    s[MASKS] = STUDENT_MASKED
    t[MASKS] = TEACHER_MASKED
    value = iBOTPatchLoss(2)(s, t, MASKS)
    assert abs(value.item() - EXPECTED) < 1e-6


def test_random_case_matches_literal_definition() -> None:
    g = torch.Generator().manual_seed(1)
    B, N, K = 4, 9, 6
    masks = torch.rand(B, N, generator=g) < 0.4
    masks[0] = False
    s = torch.randn(int(masks.sum()), K, generator=g, requires_grad=True)
    t = torch.softmax(torch.randn(int(masks.sum()), K, generator=g), dim=-1)
    value = iBOTPatchLoss(K).forward_masked(s, t, masks)
    # literal: per image, mean CE over its masked patches (0 if none); mean over all B images
    ce = -(t * F.log_softmax(s / 0.1, dim=-1)).sum(-1)
    owner = masks.nonzero()[:, 0]
    per_image = [ce[owner == b].mean() if (owner == b).any() else torch.tensor(0.0) for b in range(B)]
    assert torch.allclose(value, torch.stack(per_image).mean(), atol=1e-6)
    value.backward()
    assert torch.isfinite(s.grad).all()


def test_centring_modes() -> None:
    loss = iBOTPatchLoss(patch_out_dim=2, center_momentum=0.9)
    logits = torch.tensor([[1.0, 3.0], [3.0, 5.0]])  # mean [2, 4] -> centre [0.2, 0.4]
    loss.update_center(logits)
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.4]]))
    p = loss.softmax_center_teacher(logits, teacher_temp=0.5)
    assert torch.allclose(p, torch.softmax((logits - torch.tensor([0.2, 0.4])) / 0.5, dim=-1))
    q = loss.sinkhorn_knopp_teacher(torch.randn(5, 2), teacher_temp=0.1)
    assert q.shape == (5, 2) and torch.allclose(q.sum(-1), torch.ones(5), atol=1e-6)
