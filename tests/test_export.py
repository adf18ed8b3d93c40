"""Export: timm layout (names, shapes, features, timm's own DINOv2 converter), export dirs, load_backbone."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.nn as nn

timm = pytest.importorskip("timm")
from timm.layers import SwiGLUPacked  # noqa: E402

from model.export import (  # noqa: E402
    create_timm_model,
    export_backbone,
    flatten_block_chunks,
    infer_backbone_kwargs,
    load_backbone,
    load_timm_backbone,
    timm_model_name,
    to_timm_state_dict,
)
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
    img = 70  # depth 2: every block is alike; the full-depth layout is checked on the meta device above
    ours = vit_small(img_size=img, num_register_tokens=registers, depth=2)
    ref = timm.create_model(
        timm_model_name("vit_small", registers), pretrained=False, num_classes=0, img_size=img, depth=2
    )
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


# ---- timm's own converter of official DINOv2 checkpoints accepts our state dict ----------------


def _timm_filtered(ours: nn.Module, ref: nn.Module) -> dict[str, torch.Tensor]:
    """Our state dict through timm's `checkpoint_filter_fn`, as timm applies it to an official .pth file."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = {k: v.clone() for k, v in ours.state_dict().items()}  # the filter pops keys in place
    return checkpoint_filter_fn(sd, ref)


def _assert_same_tokens(ours: nn.Module, ref: nn.Module, registers: int, img: int) -> None:
    ours.eval()
    ref.eval()
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mine = ours.forward_features(x)
        theirs = ref.forward_features(x)
    torch.testing.assert_close(mine["x_norm_clstoken"], theirs[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mine["x_norm_patchtokens"], theirs[:, 1 + registers :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("registers", [0, 4])
def test_timm_checkpoint_filter_reads_our_layout(registers: int) -> None:
    img = 42
    ours = vit_small(img_size=img, num_register_tokens=registers, depth=2)
    _randomize(ours)
    ref = timm.create_model(
        timm_model_name("vit_small", registers), pretrained=False, num_classes=0, img_size=img, depth=2
    )
    filtered = _timm_filtered(ours, ref)
    ref.load_state_dict(filtered, strict=True)
    _assert_same_tokens(ours, ref, registers, img)
    # and our own converter gives exactly what timm's does
    mine = to_timm_state_dict(ours.state_dict(), num_register_tokens=registers)
    assert mine.keys() == filtered.keys()
    for k in mine:
        torch.testing.assert_close(mine[k], filtered[k].reshape(mine[k].shape), atol=0, rtol=0)


def test_timm_checkpoint_filter_reads_our_swiglu_layout() -> None:
    """Giant-style fused SwiGLU (w12/w3) at small width and depth, in timm's `vit_giant_patch14_dinov2`."""
    img = 28
    ours = vit_test(img_size=img, ffn_layer="swiglufused", depth=3, num_register_tokens=4)
    _randomize(ours)
    w12 = ours.blocks[0].mlp.w12.out_features
    ref = timm.create_model(
        "vit_giant_patch14_reg4_dinov2", pretrained=False, num_classes=0, img_size=img,
        embed_dim=64, depth=3, num_heads=2, mlp_ratio=w12 / 64,
    )
    ref.load_state_dict(_timm_filtered(ours, ref), strict=True)
    _assert_same_tokens(ours, ref, 4, img)


# ---- export directory: backbone.pth + backbone_timm.pth + model.json, and load_backbone ------------


def _features(model: nn.Module, img: int) -> dict[str, torch.Tensor]:
    model.eval()
    x = torch.randn(2, 3, img, img, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.forward_features(x)
    return {"cls": out["x_norm_clstoken"], "patch": out["x_norm_patchtokens"]}


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("vit_test", {"img_size": 28}),
        ("vit_test", {"img_size": 42, "ffn_layer": "swiglufused", "depth": 3, "num_register_tokens": 4}),
        ("vit_test", {"img_size": 28, "num_register_tokens": 2, "init_values": None, "drop_path_rate": 0.1}),
    ],
)
def test_export_round_trip(tmp_path: Path, arch: str, kwargs: dict) -> None:
    ours = build_backbone(arch, **kwargs)
    _randomize(ours)
    extra = {"dataset_fingerprint": "f00d", "step": 1234}
    paths = export_backbone(ours, tmp_path / "export", arch=arch, backbone_kwargs=kwargs, extra=extra)
    assert set(paths) == {"backbone", "timm", "meta"}
    names = sorted(p.name for p in (tmp_path / "export").iterdir())
    assert names == ["backbone.pth", "backbone_timm.pth", "model.json"]

    meta = json.loads(paths["meta"].read_text())
    regs = kwargs.get("num_register_tokens", 0)
    assert meta["arch"] == arch and meta["backbone_kwargs"] == kwargs
    assert (meta["patch_size"], meta["embed_dim"], meta["num_heads"]) == (14, 64, 2)
    assert meta["depth"] == kwargs.get("depth", 2) and meta["num_register_tokens"] == regs
    assert meta["img_size"] == kwargs["img_size"] and meta["ffn_layer"] == kwargs.get("ffn_layer", "mlp")
    assert meta["layerscale"] == (None if kwargs.get("init_values", 1e-5) is None else 1e-5)
    assert meta["dataset_fingerprint"] == "f00d" and meta["step"] == 1234

    sd = torch.load(paths["backbone"], weights_only=True)
    assert type(sd) is dict and set(sd) == set(ours.state_dict())
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in sd.values())

    want = _features(ours, kwargs["img_size"])
    loaded = load_backbone(tmp_path / "export")
    assert not loaded.training
    for key, value in _features(loaded, kwargs["img_size"]).items():
        assert torch.equal(value, want[key]), key
    assert torch.equal(_features(load_backbone(paths["backbone"]), kwargs["img_size"])["cls"], want["cls"])

    # the timm file: create_model with the recorded name and kwargs, strict load, same tokens
    ref = create_timm_model(meta["timm"]["model_name"], meta["timm"]["kwargs"])
    ref.load_state_dict(torch.load(paths["timm"], weights_only=True), strict=True)
    _assert_same_tokens(ours, ref, regs, kwargs["img_size"])
    _assert_same_tokens(ours, load_timm_backbone(tmp_path / "export"), regs, kwargs["img_size"])


def test_export_known_arch_uses_timm_name(tmp_path: Path) -> None:
    kwargs = {"img_size": 28, "num_register_tokens": 4, "depth": 1}
    paths = export_backbone(vit_small(**kwargs), tmp_path, arch="vit_small", backbone_kwargs=kwargs)
    meta = json.loads(paths["meta"].read_text())
    assert meta["timm"]["model_name"] == "vit_small_patch14_reg4_dinov2"


def test_export_casts_to_float32_and_overwrites_atomically(tmp_path: Path) -> None:
    ours = vit_test(img_size=28).to(torch.bfloat16)
    export_backbone(ours, tmp_path, arch="vit_test", backbone_kwargs={"img_size": 28}, extra={"step": 1})
    paths = export_backbone(ours, tmp_path, arch="vit_test", backbone_kwargs={"img_size": 28}, extra={"step": 2})
    sd = torch.load(paths["backbone"], weights_only=True)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert json.loads(paths["meta"].read_text())["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_export_without_timm_equivalent(tmp_path: Path) -> None:
    kwargs = {"img_size": 28, "ffn_bias": False}  # timm ties the FFN bias to proj_bias
    paths = export_backbone(vit_test(**kwargs), tmp_path, arch="vit_test", backbone_kwargs=kwargs)
    assert set(paths) == {"backbone", "meta"}
    meta = json.loads(paths["meta"].read_text())
    assert "proj_bias" in meta["timm"]["error"] and "timm" not in meta["files"]
    assert load_backbone(tmp_path).embed_dim == 64
    with pytest.raises(ValueError, match="no timm file"):
        load_timm_backbone(tmp_path)


def test_export_errors(tmp_path: Path) -> None:
    ours = vit_test(img_size=28)
    with pytest.raises(ValueError, match="do not match"):
        export_backbone(ours, tmp_path, arch="vit_test", backbone_kwargs={"img_size": 42})
    with pytest.raises(ValueError, match="override"):
        export_backbone(ours, tmp_path, arch="vit_test", backbone_kwargs={"img_size": 28}, extra={"arch": "x"})
    with pytest.raises(ValueError, match="JSON"):
        export_backbone(ours, tmp_path, arch="vit_test", backbone_kwargs={"img_size": 28, "act_layer": nn.GELU})
    assert not (tmp_path / "model.json").exists()


@pytest.mark.parametrize(
    ("name", "make", "arch"),
    [
        ("dinov2_vits14_reg4_pretrain.pth", lambda: vit_small(img_size=42, num_register_tokens=4, depth=2),
         "vit_small"),
        ("swiglu.pth", lambda: vit_test(img_size=28, ffn_layer="swiglufused", depth=3), "vit_test"),
        ("nols.pth", lambda: vit_test(img_size=28, init_values=None, qkv_bias=False, mlp_ratio=3), "vit_test"),
    ],
)
def test_load_official_style_file_infers_arch(tmp_path: Path, name: str, make, arch: str) -> None:
    ours = make()
    _randomize(ours)
    torch.save(ours.state_dict(), tmp_path / name)
    loaded = load_backbone(tmp_path / name)
    assert type(loaded).__name__ == "DinoVisionTransformer"
    assert (loaded.embed_dim, loaded.n_blocks, loaded.num_heads) == (ours.embed_dim, ours.n_blocks, ours.num_heads)
    assert loaded.num_register_tokens == ours.num_register_tokens
    img = ours.patch_embed.img_size[0]
    want = _features(ours, img)
    for key, value in _features(loaded, img).items():
        torch.testing.assert_close(value, want[key], atol=0, rtol=0)
    if ours.num_register_tokens:  # the hub's settings for register models
        assert (loaded.interpolate_antialias, loaded.interpolate_offset) == (True, 0.0)
    assert load_backbone(tmp_path / name, arch=arch).embed_dim == ours.embed_dim


def test_infer_backbone_kwargs_of_giant_layout() -> None:
    with torch.device("meta"):
        sd = build_backbone("vit_giant2", img_size=518, num_register_tokens=4).state_dict()
    kw = infer_backbone_kwargs(sd)
    assert kw["embed_dim"] == 1536 and kw["depth"] == 40 and kw["img_size"] == 518
    assert kw["ffn_layer"] == "swiglufused" and kw["mlp_ratio"] == 4.0 and kw["num_register_tokens"] == 4


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dinov2_vits14_pretrain.pth"):
        load_backbone(tmp_path / "nothing_here")
    (tmp_path / "dir").mkdir()
    with pytest.raises(FileNotFoundError, match="model.json"):
        load_backbone(tmp_path / "dir")
    export_backbone(vit_test(img_size=28), tmp_path / "exp", arch="vit_test", backbone_kwargs={"img_size": 28})
    with pytest.raises(ValueError, match="vit_test backbone, not vit_small"):
        load_backbone(tmp_path / "exp", arch="vit_small")
    (tmp_path / "exp" / "backbone.pth").unlink()
    with pytest.raises(FileNotFoundError, match="backbone.pth"):
        load_backbone(tmp_path / "exp")
    torch.save(vit_test(img_size=28).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ValueError, match="embed dim 64, but vit_small has 384"):
        load_backbone(tmp_path / "small.pth", arch="vit_small")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a DINOv2 backbone"):
        load_backbone(tmp_path / "other.pth")
    odd = vit_test(img_size=28, embed_dim=96, num_heads=3)
    torch.save(odd.state_dict(), tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="pass arch="):
        load_backbone(tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="embed dim 96, but vit_test has 64"):
        load_backbone(tmp_path / "odd.pth", arch="vit_test")
    assert load_backbone(tmp_path / "odd.pth", arch="vit_test", embed_dim=96, num_heads=3).embed_dim == 96
