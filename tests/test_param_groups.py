"""Layer-wise lr decay, patch-embed multiplier, weight-decay exemptions, last-layer flag."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model.ssl.param_groups import fuse_params_groups, get_params_groups_with_decay, get_vit_lr_decay_rate


class TinyBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(d, 3 * d)
        self.ls1 = nn.Module()
        self.ls1.gamma = nn.Parameter(torch.ones(d))


class TinyViT(nn.Module):
    """The official parameter names of a 2-block ViT, nothing else."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, d, 2, 2)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))
        self.register_tokens = nn.Parameter(torch.zeros(1, 2, d))
        self.blocks = nn.ModuleList([TinyBlock(d), TinyBlock(d)])
        self.norm = nn.LayerNorm(d)


class TinyHead(nn.Module):
    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        self.last_layer = nn.Module()
        self.last_layer.weight_v = nn.Parameter(torch.ones(3, d))


def _by_name(groups):
    return {g["name"]: g for g in groups}


def test_two_block_vit_exact_multipliers():
    g = _by_name(get_params_groups_with_decay(TinyViT(), lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    # depth 2: layer 0 -> 0.9**3, blocks.0 -> 0.9**2, blocks.1 -> 0.9, final norm -> 1
    expected_lr = {
        "patch_embed.proj.weight": 0.9**3 * 0.2,
        "patch_embed.proj.bias": 0.9**3 * 0.2,
        "cls_token": 0.9**3,
        "pos_embed": 0.9**3,
        "mask_token": 0.9**3,
        "register_tokens": 0.9**3,
        "blocks.0.norm1.weight": 0.9**2,
        "blocks.0.norm1.bias": 0.9**2,
        "blocks.0.attn.qkv.weight": 0.9**2,
        "blocks.0.attn.qkv.bias": 0.9**2,
        "blocks.0.ls1.gamma": 0.9**2,
        "blocks.1.attn.qkv.weight": 0.9,
        "blocks.1.ls1.gamma": 0.9,
        "norm.weight": 1.0,
        "norm.bias": 1.0,
    }
    for name, lr in expected_lr.items():
        assert g[name]["lr_multiplier"] == pytest.approx(lr, abs=1e-12), name
    decayed = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}
    for name, d in g.items():
        assert d["wd_multiplier"] == (1.0 if name in decayed else 0.0), name
        assert d["is_last_layer"] is False
    assert len(g) == 2 + 4 + 2 * 5 + 2


def test_official_token_rule_is_available():
    g = _by_name(get_params_groups_with_decay(TinyViT(), 0.9, 0.2, exempt_tokens_from_wd=False))
    assert g["cls_token"]["wd_multiplier"] == 1.0 and g["pos_embed"]["wd_multiplier"] == 1.0


def test_head_no_decay_and_last_layer_flag():
    g = _by_name(get_params_groups_with_decay(TinyHead(), lr_decay_rate=0.9, patch_embed_lr_mult=0.2))
    assert all(d["lr_multiplier"] == 1.0 for d in g.values())
    assert g["last_layer.weight_v"]["is_last_layer"] is True
    assert g["mlp.0.weight"]["is_last_layer"] is False and g["mlp.0.weight"]["wd_multiplier"] == 1.0
    assert g["mlp.0.bias"]["wd_multiplier"] == 0.0


def test_decay_rate_function_matches_official_formula():
    assert get_vit_lr_decay_rate("blocks.11.mlp.fc1.weight", 0.9, num_layers=12) == pytest.approx(0.9)
    assert get_vit_lr_decay_rate("blocks.0.mlp.fc1.weight", 0.9, num_layers=12) == pytest.approx(0.9**12)
    assert get_vit_lr_decay_rate("backbone.blocks.3.attn.qkv.weight", 0.5, num_layers=4) == pytest.approx(0.5)
    assert get_vit_lr_decay_rate("blocks.1.4.attn.qkv.weight", 0.5, num_layers=8) == pytest.approx(0.5**4)  # chunked
    assert get_vit_lr_decay_rate("pos_embed", 0.5, num_layers=2) == pytest.approx(0.125)
    assert get_vit_lr_decay_rate("norm.weight", 0.5, num_layers=2) == 1.0


def test_fuse_and_frozen_params():
    m = TinyViT()
    m.mask_token.requires_grad_(False)
    groups = get_params_groups_with_decay(m, 0.9, 0.2)
    assert "mask_token" not in _by_name(groups)
    fused = fuse_params_groups(groups)
    assert sum(len(f["params"]) for f in fused) == len(groups)
    keys = {(f["lr_multiplier"], f["wd_multiplier"], f["is_last_layer"]) for f in fused}
    assert len(keys) == len(fused)
    torch.optim.AdamW(fused)  # accepted by the optimizer (extra keys are kept in the groups)
