"""Embedding model specs: ``family:arch:weights`` strings, parsed and printed canonically.

Accepted forms (``none`` is case-insensitive and means random init, the only way to get it)::

    open_clip:<arch>:<pretrained tag>     open_clip:ViT-H-14:laion2b_s32b_b79k
    open_clip:<arch>:<checkpoint path>    open_clip:ViT-B-32:/ckpt/open_clip_pytorch_model.bin
    open_clip:<arch>:none                 open_clip:ViT-B-32:none
    dinov2:<checkpoint path>              arch inferred from the checkpoint's shapes
    dinov2:<arch>:<checkpoint path>       dinov2:vit_large:/ckpt/dinov2_vitl14_pretrain.pth
    dinov2:<arch>:none                    dinov2:vit_small:none
    timm:<name>                           timm's pretrained weights (its hub cache)
    timm:<name>:<checkpoint path>         timm:vit_small_patch16_224:/ckpt/model.safetensors
    timm:<name>:none                      timm:resnet18:none
    timm:<name>:package                   weights shipped in an installed package (offline):
                                          timm:efficientnet_lite0:package

An open_clip ``weights`` is a checkpoint path when it contains a path separator or ends in a
checkpoint extension, otherwise a pretrained tag (normalised like open_clip: lower case, ``-`` →
``_``). ``dinov2`` archs are the factories of ``model.layers.vit`` or ``auto``. Paths are kept as
written (resolve them against the working directory of the process that loads the model).

This module imports nothing heavy: config validation may use it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = ["AUTO", "DINOV2_ARCHS", "FAMILIES", "SPEC_FORMS", "TIMM_PACKAGE", "TIMM_PRETRAINED", "ModelSpec",
           "parse_spec"]

FAMILIES: tuple[str, ...] = ("open_clip", "dinov2", "timm")
AUTO = "auto"
# ``ModelSpec.weights`` of ``timm:<name>``: timm's own pretrained weights for that name.
# ``timm:<name>:pretrained`` parses to the same spec (write ``./pretrained`` for a file so named).
TIMM_PRETRAINED = "pretrained"
# ``timm:<name>:package``: weights that ship inside an installed Python package
# (``pipeline.embedding.packaged``; write ``./package`` for a file so named).
TIMM_PACKAGE = "package"
# The factories of model.layers.vit.BACKBONES (kept here so parsing needs no torch import;
# tests/test_embedding_spec.py checks that the two agree).
DINOV2_ARCHS: tuple[str, ...] = ("vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2")
CHECKPOINT_EXTENSIONS: tuple[str, ...] = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")

SPEC_FORMS = """accepted model specs:
  open_clip:<arch>:<pretrained tag | checkpoint path | none>   e.g. open_clip:ViT-H-14:laion2b_s32b_b79k
  dinov2:<checkpoint path>                                     (arch inferred from the checkpoint)
  dinov2:<arch>:<checkpoint path | none>                       arch: auto, """ + ", ".join(DINOV2_ARCHS) + """
  timm:<name>                                                  (timm's pretrained weights, from its cache)
  timm:<name>:<checkpoint path | none>
  timm:<name>:package                                          (weights shipped in an installed package,
                                                               e.g. timm:efficientnet_lite0:package)
'none' means random init; it is never chosen implicitly."""


def _is_none(text: str) -> bool:
    return text.strip().lower() == "none"


def looks_like_path(weights: str) -> bool:
    """True for an open_clip ``weights`` that names a file rather than a pretrained tag."""
    return (
        "/" in weights
        or os.sep in weights
        or weights.startswith((".", "~"))
        or weights.lower().endswith(CHECKPOINT_EXTENSIONS)
    )


def _clean_tag(tag: str) -> str:
    """open_clip's tag normalisation (``open_clip.pretrained._clean_tag``)."""
    return tag.lower().replace("-", "_")


@dataclass(frozen=True)
class ModelSpec:
    """One embedding model: library family, architecture and where its weights come from.

    ``weights`` is an open_clip pretrained tag, a checkpoint path, ``TIMM_PRETRAINED`` for
    ``timm:<name>``, ``TIMM_PACKAGE`` for ``timm:<name>:package``, or None for an explicit
    ``none`` (random init).
    """

    family: str
    arch: str
    weights: str | None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {list(FAMILIES)}\n{SPEC_FORMS}")
        if not self.arch or self.arch != self.arch.strip() or ":" in self.arch:
            raise ValueError(f"bad {self.family} arch {self.arch!r}\n{SPEC_FORMS}")
        if self.weights is not None and (not self.weights or self.weights != self.weights.strip()):
            raise ValueError(f"bad weights {self.weights!r} (use None for random init)\n{SPEC_FORMS}")
        if self.weights is not None and _is_none(self.weights):
            raise ValueError(f"weights {self.weights!r}: use None for random init (./{self.weights} for a file)")
        if self.family == "dinov2":
            if self.arch not in DINOV2_ARCHS and self.arch != AUTO:
                raise ValueError(f"unknown dinov2 arch {self.arch!r}; expected {AUTO} or one of {list(DINOV2_ARCHS)}")
            if self.arch == AUTO and self.weights is None:
                raise ValueError("dinov2 arch 'auto' is inferred from a checkpoint; with 'none' name the arch, "
                                 "e.g. dinov2:vit_small:none")
        if self.family == "open_clip" and self.weights is not None and not looks_like_path(self.weights):
            object.__setattr__(self, "weights", _clean_tag(self.weights))

    @property
    def is_random(self) -> bool:
        """Random init (the spec said ``none``)."""
        return self.weights is None

    @property
    def checkpoint(self) -> str | None:
        """The explicit checkpoint path of the spec, if it names one."""
        if self.weights is None:
            return None
        if self.family == "dinov2":
            return self.weights
        if self.family == "timm":
            return None if self.weights in (TIMM_PRETRAINED, TIMM_PACKAGE) else self.weights
        return self.weights if looks_like_path(self.weights) else None

    @property
    def is_packaged(self) -> bool:
        """Weights from an installed package (``timm:<name>:package``)."""
        return self.family == "timm" and self.weights == TIMM_PACKAGE

    @property
    def pretrained_tag(self) -> str | None:
        """The open_clip pretrained tag, if the spec names one."""
        if self.family == "open_clip" and self.weights is not None and self.checkpoint is None:
            return self.weights
        return None

    def __str__(self) -> str:
        weights = "none" if self.weights is None else self.weights
        if self.family == "timm" and self.weights == TIMM_PRETRAINED:
            return f"timm:{self.arch}"
        if self.family == "dinov2" and self.arch == AUTO:
            head = weights.partition(":")[0]
            if head not in DINOV2_ARCHS and head != AUTO and not _is_none(weights):
                return f"dinov2:{weights}"
        return f"{self.family}:{self.arch}:{weights}"


def parse_spec(spec: str | ModelSpec) -> ModelSpec:
    """Parse a model spec string (see the module docstring); a ModelSpec is returned unchanged."""
    if isinstance(spec, ModelSpec):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"model spec must be a string, got {type(spec).__name__}\n{SPEC_FORMS}")
    family, sep, rest = spec.strip().partition(":")
    if not sep or not rest:
        raise ValueError(f"bad model spec {spec!r}\n{SPEC_FORMS}")
    if family == "open_clip":
        arch, sep, weights = rest.partition(":")
        if not sep or not arch or not weights:
            raise ValueError(f"bad model spec {spec!r}: open_clip needs <arch>:<pretrained tag | path | none>"
                             f"\n{SPEC_FORMS}")
        return ModelSpec("open_clip", arch, None if _is_none(weights) else weights)
    if family == "dinov2":
        head, sep, tail = rest.partition(":")
        if head in DINOV2_ARCHS or head == AUTO:
            if not sep or not tail:
                raise ValueError(f"bad model spec {spec!r}: dinov2:{head} needs a checkpoint path or none"
                                 f"\n{SPEC_FORMS}")
            return ModelSpec("dinov2", head, None if _is_none(tail) else tail)
        if head.startswith("vit_") and sep:
            raise ValueError(f"bad model spec {spec!r}: unknown dinov2 arch {head!r}; expected {AUTO} or one of "
                             f"{list(DINOV2_ARCHS)}\n{SPEC_FORMS}")
        if _is_none(rest):
            raise ValueError(f"bad model spec {spec!r}: random init needs an arch, e.g. dinov2:vit_small:none"
                             f"\n{SPEC_FORMS}")
        return ModelSpec("dinov2", AUTO, rest)
    if family == "timm":
        name, sep, weights = rest.partition(":")
        if not name or (sep and not weights):
            raise ValueError(f"bad model spec {spec!r}\n{SPEC_FORMS}")
        if name in ("hf-hub", "hf_hub", "local-dir"):
            raise ValueError(f"bad model spec {spec!r}: timm '{name}:' model names are not supported; "
                             f"give a registered timm model name and a checkpoint path\n{SPEC_FORMS}")
        if not sep or weights == TIMM_PRETRAINED:
            return ModelSpec("timm", name, TIMM_PRETRAINED)
        return ModelSpec("timm", name, None if _is_none(weights) else weights)
    raise ValueError(f"bad model spec {spec!r}: unknown family {family!r}\n{SPEC_FORMS}")
