"""Declarative loss composition: ``total = Σ weight_i · term_i(outputs)``.

The meta-architecture computes one ``outputs`` dict per step (head outputs of the student,
centred teacher targets, masks, crop counts, …); each :class:`LossTerm` reads what it needs
from it. Adding, removing or re-weighting a term is a change to the list, not to a closure.

Keys of ``outputs`` used by the built-in terms (all produced by ``SSLMetaArch``):

- ``n_global_crops``, ``n_local_crops`` (ints)
- ``student_global_cls_head`` [n_global·B, K]: student DINO-head outputs, global crops, crop-major
- ``student_local_cls_head`` [n_local·B, K]: same for the local crops
- ``teacher_dino_targets`` [n_global, B, K]: centred teacher probabilities, same crop order as the
  student globals (the loss skips same-view pairs)
- ``student_global_cls`` [n_global·B, D]: student backbone CLS tokens (KoLeo)
- ``student_masked_patch_head`` [M, K']: student iBOT-head outputs of the M masked patches
- ``teacher_masked_patch_targets`` [M, K']: centred teacher probabilities of the same patches
- ``masks`` [n_global·B, N] bool, ``masks_weight`` [M], ``n_masked_patches`` (int)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from torch import Tensor, nn

Outputs = Mapping[str, Any]


@dataclass
class LossTerm:
    """A named, weighted loss: ``module(outputs) -> scalar tensor``."""

    name: str
    weight: float
    module: Callable[[Outputs], Tensor]


class DinoCrossViewTerm(nn.Module):
    """DINO loss over all (student crop, teacher global crop) pairs except same-view pairs.

    ``DINOLoss`` (model.losses) does the pairing and the normalisation by the number of pairs
    ``n_g·(n_g−1) + n_g·n_local``; this term only reshapes the flat crop-major head outputs.
    """

    def __init__(self, dino_loss: nn.Module) -> None:
        super().__init__()
        self.dino_loss = dino_loss

    def forward(self, outputs: Outputs) -> Tensor:
        n_g, n_l = outputs["n_global_crops"], outputs["n_local_crops"]
        teacher = outputs["teacher_dino_targets"]  # [n_g, B, K], same view order as the student
        student_g = outputs["student_global_cls_head"].unflatten(0, (n_g, -1))
        student_l = outputs["student_local_cls_head"].unflatten(0, (n_l, -1)) if n_l > 0 else None
        return self.dino_loss(student_g, teacher, student_l)


class IbotMaskedPatchTerm(nn.Module):
    """iBOT loss on the masked patch tokens of the student's global crops."""

    def __init__(self, ibot_loss: nn.Module) -> None:
        super().__init__()
        self.ibot_loss = ibot_loss

    def forward(self, outputs: Outputs) -> Tensor:
        return self.ibot_loss.forward_masked(
            outputs["student_masked_patch_head"],
            outputs["teacher_masked_patch_targets"],
            student_masks_flat=outputs["masks"],
            n_masked_patches=outputs["n_masked_patches"],
            masks_weight=outputs["masks_weight"],
        )


class KoLeoTerm(nn.Module):
    """KoLeo on the student's backbone CLS tokens, within each global crop (never across views of one image)."""

    def __init__(self, koleo_loss: nn.Module) -> None:
        super().__init__()
        self.koleo_loss = koleo_loss

    def forward(self, outputs: Outputs) -> Tensor:
        cls = outputs["student_global_cls"].float()
        return sum(self.koleo_loss(p) for p in cls.chunk(outputs["n_global_crops"]))


class LossComposition:
    """``compute(outputs) -> (total, {name: unweighted value})``; zero-weight terms are skipped."""

    def __init__(self, terms: Sequence[LossTerm]) -> None:
        names = [t.name for t in terms]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate loss term names: {names}")
        self.terms = list(terms)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def compute(self, outputs: Outputs) -> tuple[Tensor, dict[str, Tensor]]:
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        for term in self.terms:
            if term.weight == 0:
                continue
            value = term.module(outputs)
            values[term.name] = value
            total = term.weight * value if total is None else total + term.weight * value
        if total is None:
            raise ValueError("no loss term with a non-zero weight")
        return total, values

    def __repr__(self) -> str:
        inner = ", ".join(f"{t.name}×{t.weight}" for t in self.terms)
        return f"LossComposition({inner})"


def default_loss_terms(
    dino_loss: nn.Module | None,
    ibot_loss: nn.Module | None,
    koleo_loss: nn.Module | None,
    dino_weight: float = 1.0,
    ibot_weight: float = 1.0,
    koleo_weight: float = 0.1,
) -> list[LossTerm]:
    """DINO (1.0), iBOT (1.0), KoLeo (0.1) — the DINOv2 composition; ``None`` modules are left out."""
    terms = []
    if dino_loss is not None:
        terms.append(LossTerm("dino", dino_weight, DinoCrossViewTerm(dino_loss)))
    if ibot_loss is not None:
        terms.append(LossTerm("ibot", ibot_weight, IbotMaskedPatchTerm(ibot_loss)))
    if koleo_loss is not None:
        terms.append(LossTerm("koleo", koleo_weight, KoLeoTerm(koleo_loss)))
    return terms
