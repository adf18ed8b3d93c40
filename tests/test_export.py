"""Export to timm's `vit_*_patch14_dinov2` layout: names, shapes and features."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.layers import SwiGLUPacked  # noqa: E402

from model.export import flatten_block_chunks, timm_model_name, to_timm_state_dict  # noqa: E402
from model.layers.vit import build_backbone, vit_small, vit_test  # noqa: E402


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything (timm, huggingface_hub) tries to open a connection."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _randomize(model: nn.Module, seed: int = 0) -> None:
    """Give every parameter non-trivial values so that a layout mismatch shows in the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * noise)
            elif name.endswith("gamma"):
                p.copy_(0.5 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def test_timm_model_name() -> None:
    assert timm_model_name("vit_small") == "vit_small_patch14_dinov2"
    assert timm_model_name("vit_giant2", 4) == "vit_giant_patch14_reg4_dinov2"
    assert timm_model_name("vit_large", True) == "vit_large_patch14_reg4_dinov2"
    with pytest.raises(ValueError):
        timm_model_name("vit_test")
    with pytest.raises(ValueError):
        timm_model_name("vit_base", 2)


@pytest.mark.parametrize(
    ("arch", "registers"),
    [("vit_small", 0), ("vit_base", 0), ("vit_large", 0), ("vit_giant2", 0), ("vit_small", 4), ("vit_giant2", 4)],
)
def test_names_and_shapes_match_timm(arch: str, registers: int) -> None:
    with torch.device("meta"):
        ours = build_backbone(arch, num_register_tokens=registers)
        ref = timm.create_model(timm_model_name(arch, registers), pretrained=False, num_classes=0, img_size=224)
    exported = to_timm_state_dict(ours.state_dict(), num_register_tokens=registers)
    assert _shapes(exported) == _shapes(ref.state_dict())


def test_giant_swiglu_hidden_width() -> None:
    with torch.device("meta"):
        sd = build_backbone("vit_giant2").state_dict()
    assert sd["blocks.39.mlp.w12.weight"].shape == (2 * 4096, 1536)
    assert sd["blocks.39.mlp.w3.weight"].shape == (1536, 4096)
    assert "blocks.40.norm1.weight" not in sd


def _compare_features(ours: nn.Module, ref: nn.Module, registers: int, img: int) -> None:
    _randomize(ours)
    ref.load_state_dict(to_timm_state_dict(ours.state_dict(), num_register_tokens=registers), strict=True)
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours.forward_features(x)
        theirs = ref.forward_features(x)
    torch.testing.assert_close(mine["x_norm_clstoken"], theirs[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["x_norm_regtokens"], theirs[:, 1 : 1 + registers], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["x_norm_patchtokens"], theirs[:, 1 + registers :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_vit_small_features_equal_timm(registers: int) -> None:
    img = 70
    ours = vit_small(img_size=img, num_register_tokens=registers)
    ref = timm.create_model(timm_model_name("vit_small", registers), pretrained=False, num_classes=0, img_size=img)
    _compare_features(ours, ref, registers, img)


def test_swiglu_features_equal_timm() -> None:
    """Small SwiGLU config: timm's `SwiGLUPacked` with fc1 width = our w12 width (the ViT-g recipe)."""
    img = 56
    ours = vit_test(img_size=img, ffn_layer="swiglufused", depth=3)
    w12 = ours.blocks[0].mlp.w12.out_features
    ref = timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        num_classes=0,
        img_size=img,
        embed_dim=64,
        depth=3,
        num_heads=2,
        mlp_ratio=w12 / 64,
        mlp_layer=SwiGLUPacked,
        act_layer=nn.SiLU,
    )
    _compare_features(ours, ref, 0, img)


def test_flatten_block_chunks() -> None:
    sd = {"blocks.1.7.norm1.weight": torch.ones(1), "blocks.3.norm1.weight": torch.ones(1), "norm.bias": torch.ones(1)}
    assert set(flatten_block_chunks(sd)) == {"blocks.7.norm1.weight", "blocks.3.norm1.weight", "norm.bias"}


def test_register_count_must_agree() -> None:
    sd = vit_test(num_register_tokens=2).state_dict()
    with pytest.raises(ValueError):
        to_timm_state_dict(sd, num_register_tokens=0)
