"""DinoVisionTransformer: official key layout, features, mask token, position-embedding interpolation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.layers.vit import BACKBONES, DinoVisionTransformer, build_backbone, vit_small, vit_test


def _official_keys(depth: int, registers: int, swiglu: bool) -> set[str]:
    """Key set of an official DINOv2 checkpoint (flat blocks)."""
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    keys |= {"norm.weight", "norm.bias"} | ({"register_tokens"} if registers else set())
    ffn = ("w12", "w3") if swiglu else ("fc1", "fc2")
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", f"mlp.{ffn[0]}", f"mlp.{ffn[1]}"):
            keys |= {f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"}
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("ffn", ["mlp", "swiglufused"])
def test_state_dict_keys_are_official(registers: int, ffn: str) -> None:
    model = vit_test(num_register_tokens=registers, ffn_layer=ffn)
    assert set(model.state_dict()) == _official_keys(2, registers, ffn != "mlp")


def test_official_pretrain_shapes_at_518() -> None:
    """dinov2_vits14_pretrain.pth: 37×37 position grid + CLS, registers (1, 4, 384), mask token (1, 384)."""
    with torch.device("meta"):
        sd = vit_small(img_size=518, num_register_tokens=4).state_dict()
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sd["register_tokens"].shape == (1, 4, 384)
    assert sd["mask_token"].shape == (1, 384)
    assert sd["patch_embed.proj.weight"].shape == (384, 3, 14, 14)


def test_registry_and_factories() -> None:
    assert {"vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"} <= set(BACKBONES)
    with torch.device("meta"):
        g = build_backbone("vit_giant2")
        t = build_backbone("vit_tiny")
    assert (g.embed_dim, len(g.blocks), g.num_heads) == (1536, 40, 24)
    assert (t.embed_dim, len(t.blocks), t.num_heads) == (192, 12, 3)
    assert build_backbone("vit_test", depth=3).n_blocks == 3
    with pytest.raises(ValueError):
        build_backbone("vit_huge")


def test_init_follows_official() -> None:
    torch.manual_seed(0)
    m = vit_small(img_size=70)
    assert torch.all(m.mask_token == 0)
    assert m.cls_token.abs().max() < 1e-4
    assert 0.015 < m.pos_embed.std() < 0.025
    assert torch.all(m.blocks[0].ls1.gamma == 1e-5)
    assert torch.all(m.blocks[0].attn.qkv.bias == 0)
    assert 0.015 < m.blocks[0].attn.qkv.weight.std() < 0.025
    assert isinstance(vit_test(init_values=None).blocks[0].ls1, torch.nn.Identity)


def test_forward_features_dict_and_forward() -> None:
    torch.manual_seed(0)
    m = vit_test(num_register_tokens=3, img_size=56).eval()
    x = torch.randn(2, 3, 56, 56)
    out = m.forward_features(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 64)
    assert out["x_norm_regtokens"].shape == (2, 3, 64)
    assert out["x_norm_patchtokens"].shape == (2, 16, 64)
    assert out["x_prenorm"].shape == (2, 20, 64)
    torch.testing.assert_close(m.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    torch.testing.assert_close(m(x), out["x_norm_clstoken"])
    assert m(x, is_training=True)["x_norm_patchtokens"].shape == (2, 16, 64)


def test_mask_token_replaces_masked_patches_before_pos_embed() -> None:
    torch.manual_seed(0)
    m = vit_test(img_size=56, num_register_tokens=2).eval()
    x = torch.randn(2, 3, 56, 56)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    tokens = m.prepare_tokens_with_masks(x, masks)
    plain = m.prepare_tokens_with_masks(x)
    patches, plain_patches = tokens[:, 3:], plain[:, 3:]  # CLS + 2 registers first
    pos = m.pos_embed[:, 1:]
    torch.testing.assert_close(patches[0, 5], m.mask_token[0] + pos[0, 5])
    torch.testing.assert_close(patches[~masks], plain_patches[~masks])
    torch.testing.assert_close(tokens[:, 1:3], m.register_tokens.expand(2, -1, -1))  # registers: no pos embed
    # fully masked images give identical features whatever the pixels
    full = torch.ones(2, 16, dtype=torch.bool)
    out = m.forward_features(x, full)
    torch.testing.assert_close(out["x_norm_clstoken"][0], out["x_norm_clstoken"][1])
    assert out["masks"] is full


def _official_interpolate(pos_embed: torch.Tensor, w: int, h: int, patch: int, offset: float, aa: bool) -> torch.Tensor:
    """Transcription of the official `interpolate_pos_encoding` (facebookresearch/dinov2)."""
    pos_embed = pos_embed.float()
    n = pos_embed.shape[1] - 1
    class_pos_embed, patch_pos_embed = pos_embed[:, 0], pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0, h0 = w // patch, h // patch
    m = int(math.sqrt(n))
    kwargs = {"scale_factor": ((w0 + offset) / m, (h0 + offset) / m)} if offset else {"size": (w0, h0)}
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, m, m, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=aa, **kwargs
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize(("offset", "antialias"), [(0.1, False), (0.0, True), (0.0, False)])
@pytest.mark.parametrize(("h", "w"), [(28, 28), (98, 98), (42, 70)])
def test_interpolate_pos_encoding_matches_official(offset: float, antialias: bool, h: int, w: int) -> None:
    torch.manual_seed(0)
    m = vit_test(img_size=56, interpolate_offset=offset, interpolate_antialias=antialias)
    x = torch.zeros(1, 1 + (h // 14) * (w // 14), 64)
    got = m.interpolate_pos_encoding(x, h, w)
    assert got.shape == x.shape
    torch.testing.assert_close(got, _official_interpolate(m.pos_embed.detach(), h, w, 14, offset, antialias))


def test_offset_changes_resampling_and_same_grid_is_identity() -> None:
    torch.manual_seed(0)
    a = vit_test(img_size=56, interpolate_offset=0.1)
    b = vit_test(img_size=56, interpolate_offset=0.0)
    b.load_state_dict(a.state_dict())
    x = torch.zeros(1, 1 + 36, 64)
    assert not torch.allclose(a.interpolate_pos_encoding(x, 84, 84), b.interpolate_pos_encoding(x, 84, 84))
    assert a.interpolate_pos_encoding(torch.zeros(1, 17, 64), 56, 56) is a.pos_embed


def test_any_input_size_and_patch_multiple_check() -> None:
    m = vit_test(img_size=56).eval()
    assert m.forward_features(torch.randn(1, 3, 42, 70))["x_norm_patchtokens"].shape == (1, 15, 64)
    with pytest.raises(ValueError):
        m(torch.randn(1, 3, 50, 56))


def test_get_intermediate_layers() -> None:
    torch.manual_seed(0)
    m = vit_test(img_size=56, num_register_tokens=1, depth=3).eval()
    x = torch.randn(2, 3, 56, 56)
    layers = m.get_intermediate_layers(x, n=2, reshape=True, return_class_token=True)
    assert len(layers) == 2 and layers[-1][0].shape == (2, 64, 4, 4)
    final = m.forward_features(x)
    torch.testing.assert_close(layers[-1][1], final["x_norm_clstoken"])
    torch.testing.assert_close(m.get_intermediate_layers(x, n=[2])[0], final["x_norm_patchtokens"])


def test_backward_and_bf16_autocast() -> None:
    m = vit_test(img_size=28, drop_path_rate=0.3, drop_path_uniform=True).train()
    x = torch.randn(4, 3, 28, 28)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, is_training=True)
    out["x_norm_clstoken"].float().sum().backward()
    assert m.pos_embed.grad is not None and m.blocks[1].mlp.fc1.weight.grad is not None


def test_unknown_ffn_layer() -> None:
    with pytest.raises(ValueError):
        DinoVisionTransformer(embed_dim=64, depth=1, num_heads=2, ffn_layer="moe")
