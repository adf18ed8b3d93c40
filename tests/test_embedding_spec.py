"""Model spec strings: accepted forms, canonical round trip, errors."""
from __future__ import annotations

import pytest

from pipeline.embedding.spec import AUTO, DINOV2_ARCHS, SPEC_FORMS, TIMM_PRETRAINED, ModelSpec, parse_spec

ACCEPTED = [
    # (spec, (family, arch, weights), canonical string)
    ("open_clip:ViT-H-14:laion2b_s32b_b79k", ("open_clip", "ViT-H-14", "laion2b_s32b_b79k"),
     "open_clip:ViT-H-14:laion2b_s32b_b79k"),
    ("open_clip:ViT-B-32:LAION2B-s34B-b79K", ("open_clip", "ViT-B-32", "laion2b_s34b_b79k"),
     "open_clip:ViT-B-32:laion2b_s34b_b79k"),
    ("open_clip:ViT-B-32:none", ("open_clip", "ViT-B-32", None), "open_clip:ViT-B-32:none"),
    ("open_clip:ViT-B-32:NONE", ("open_clip", "ViT-B-32", None), "open_clip:ViT-B-32:none"),
    ("open_clip:ViT-B-32:/ckpt/Open_Clip.bin", ("open_clip", "ViT-B-32", "/ckpt/Open_Clip.bin"),
     "open_clip:ViT-B-32:/ckpt/Open_Clip.bin"),
    ("open_clip:ViT-B-32:weights.safetensors", ("open_clip", "ViT-B-32", "weights.safetensors"),
     "open_clip:ViT-B-32:weights.safetensors"),
    ("dinov2:/ckpt/dinov2_vits14_pretrain.pth", ("dinov2", AUTO, "/ckpt/dinov2_vits14_pretrain.pth"),
     "dinov2:/ckpt/dinov2_vits14_pretrain.pth"),
    ("dinov2:runs/a:b/teacher.pth", ("dinov2", AUTO, "runs/a:b/teacher.pth"), "dinov2:runs/a:b/teacher.pth"),
    ("dinov2:auto:/c/x.pth", ("dinov2", AUTO, "/c/x.pth"), "dinov2:/c/x.pth"),
    ("dinov2:auto:vit_small:x.pth", ("dinov2", AUTO, "vit_small:x.pth"), "dinov2:auto:vit_small:x.pth"),
    ("dinov2:vit_large:/c/x.pth", ("dinov2", "vit_large", "/c/x.pth"), "dinov2:vit_large:/c/x.pth"),
    ("dinov2:vit_small:none", ("dinov2", "vit_small", None), "dinov2:vit_small:none"),
    ("timm:vit_small_patch14_dinov2.lvd142m", ("timm", "vit_small_patch14_dinov2.lvd142m", TIMM_PRETRAINED),
     "timm:vit_small_patch14_dinov2.lvd142m"),
    ("timm:resnet18:pretrained", ("timm", "resnet18", TIMM_PRETRAINED), "timm:resnet18"),
    ("timm:resnet18:none", ("timm", "resnet18", None), "timm:resnet18:none"),
    ("timm:resnet18:/c/r18.safetensors", ("timm", "resnet18", "/c/r18.safetensors"), "timm:resnet18:/c/r18.safetensors"),
    ("  timm:resnet18  ", ("timm", "resnet18", TIMM_PRETRAINED), "timm:resnet18"),
]


@pytest.mark.parametrize(("text", "fields", "canonical"), ACCEPTED, ids=[a[0].strip() for a in ACCEPTED])
def test_accepted_forms_and_canonical_round_trip(text: str, fields: tuple, canonical: str) -> None:
    spec = parse_spec(text)
    assert (spec.family, spec.arch, spec.weights) == fields
    assert str(spec) == canonical
    assert parse_spec(str(spec)) == spec
    assert parse_spec(spec) is spec
    assert str(parse_spec(canonical)) == canonical


def test_helpers() -> None:
    assert parse_spec("open_clip:ViT-H-14:laion2b_s32b_b79k").pretrained_tag == "laion2b_s32b_b79k"
    assert parse_spec("open_clip:ViT-H-14:laion2b_s32b_b79k").checkpoint is None
    assert parse_spec("open_clip:ViT-B-32:/x/y.bin").checkpoint == "/x/y.bin"
    assert parse_spec("open_clip:ViT-B-32:/x/y.bin").pretrained_tag is None
    assert parse_spec("timm:resnet18").checkpoint is None
    assert parse_spec("timm:resnet18:r.pth").checkpoint == "r.pth"
    assert parse_spec("dinov2:x.pth").checkpoint == "x.pth"
    for text in ("open_clip:ViT-B-32:none", "dinov2:vit_test:none", "timm:resnet18:none"):
        assert parse_spec(text).is_random and parse_spec(text).checkpoint is None
    assert not parse_spec("timm:resnet18").is_random


def test_dinov2_archs_match_backbone_registry() -> None:
    from model.layers.vit import BACKBONES

    assert set(DINOV2_ARCHS) == set(BACKBONES)


@pytest.mark.parametrize("text", [
    "", "open_clip", "foo:bar:baz", "clip:ViT-B-32:openai", "open_clip:ViT-B-32", "open_clip::laion", "open_clip:ViT-B-32:",
    "dinov2:", "dinov2:vit_small", "dinov2:none", "dinov2:auto:none", "dinov2:auto", "dinov2:vit_huge:/x.pth",
    "timm:", "timm:resnet18:", "timm::x", "timm:hf-hub:timm/resnet18.a1_in1k",
])
def test_rejected_forms_show_accepted_forms(text: str) -> None:
    with pytest.raises(ValueError) as err:
        parse_spec(text)
    message = str(err.value)
    assert "open_clip:<arch>" in message or "none" in message, message
    if text in ("", "foo:bar:baz", "open_clip:ViT-B-32", "timm:resnet18:", "dinov2:vit_small"):
        assert SPEC_FORMS in message


def test_model_spec_validation() -> None:
    with pytest.raises(ValueError, match="family"):
        ModelSpec("clip", "ViT-B-32", None)
    with pytest.raises(ValueError, match="arch"):
        ModelSpec("dinov2", "vit_huge", None)
    with pytest.raises(ValueError):
        ModelSpec("dinov2", AUTO, None)
    with pytest.raises(ValueError, match="None"):
        ModelSpec("timm", "resnet18", "none")
    with pytest.raises(ValueError):
        ModelSpec("timm", "resnet18", "")
    with pytest.raises(ValueError):
        ModelSpec("timm", "a:b", None)
    assert ModelSpec("open_clip", "ViT-B-32", "LAION2B-s34B-b79K").weights == "laion2b_s34b_b79k"
    assert parse_spec("open_clip:ViT-B-32:laion2b_s34b_b79k") == ModelSpec("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    with pytest.raises(AttributeError):
        parse_spec("timm:resnet18").arch = "x"  # type: ignore[misc]
