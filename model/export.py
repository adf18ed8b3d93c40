"""Backbone export: the official DINOv2 state-dict layout (ours), timm's `vit_*_patch14_dinov2`, and loading.

An export directory holds `backbone.pth` (official key layout, float32 CPU tensors),
`backbone_timm.pth` (timm layout) and `model.json` (architecture, timm name + kwargs, extra
fields such as the dataset fingerprint). `load_backbone` reads it back, or an official
`dinov2_vit*14*_pretrain.pth` file with the architecture inferred from the weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Mapping

import torch
import torch.nn as nn
from torch import Tensor

from model.layers.mlp import swiglu_hidden
from model.layers.vit import DinoVisionTransformer, build_backbone

_TIMM_SIZES = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant"}
_CHUNKED = re.compile(r"^blocks\.\d+\.(\d+)\.")


def timm_model_name(arch: str, registers: int | bool = 0) -> str:
    """timm model name for a backbone arch, e.g. ("vit_small", 4) → "vit_small_patch14_reg4_dinov2"."""
    if arch not in _TIMM_SIZES:
        raise ValueError(f"{arch!r} has no timm DINOv2 counterpart; expected one of {sorted(_TIMM_SIZES)}")
    n_reg = 4 if registers is True else int(registers)
    if n_reg not in (0, 4):
        raise ValueError(f"timm has DINOv2 models with 0 or 4 registers, not {n_reg}")
    return f"{_TIMM_SIZES[arch]}_patch14{'_reg4' if n_reg else ''}_dinov2"


def flatten_block_chunks(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename FSDP-chunked training keys `blocks.<chunk>.<i>.*` to the flat `blocks.<i>.*` layout."""
    return {_CHUNKED.sub(r"blocks.\1.", k): v for k, v in sd.items()}


def to_timm_state_dict(sd: dict[str, Tensor], num_register_tokens: int = 0) -> dict[str, Tensor]:
    """Official/our layout → timm layout (drops `mask_token`; SwiGLU `w12`/`w3` → `fc1`/`fc2`).

    With registers, timm's `no_embed_class` layout takes `reg_token`, a CLS token with its position
    embedding folded in, and patch-only position embeddings.
    """
    sd = flatten_block_chunks(sd)
    out: dict[str, Tensor] = {}
    has_registers = "register_tokens" in sd
    if has_registers != bool(num_register_tokens):
        raise ValueError(f"num_register_tokens={num_register_tokens} but register_tokens present={has_registers}")
    for k, v in sd.items():
        if k == "mask_token":
            continue
        if has_registers and k in ("register_tokens", "cls_token", "pos_embed"):
            continue
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w12\.", r"\1.fc1.", k)
        k = re.sub(r"^(blocks\.\d+\.mlp)\.w3\.", r"\1.fc2.", k)
        out[k] = v
    if has_registers:
        out["reg_token"] = sd["register_tokens"]
        out["cls_token"] = sd["cls_token"] + sd["pos_embed"][:, :1]
        out["pos_embed"] = sd["pos_embed"][:, 1:]
    return out


# --------------------------------------------------------------------------------------------
# Export directory: backbone.pth (official layout) + backbone_timm.pth (timm layout) + model.json
# --------------------------------------------------------------------------------------------

BACKBONE_FILE = "backbone.pth"
TIMM_FILE = "backbone_timm.pth"
META_FILE = "model.json"
FORMAT = "lvd-dinov2-backbone"
FORMAT_VERSION = 1
# embed dim → registered arch (the number of heads cannot be read from the weights' shapes)
_ARCH_BY_DIM = {
    64: "vit_test", 192: "vit_tiny", 384: "vit_small", 768: "vit_base", 1024: "vit_large", 1536: "vit_giant2",
}
_WRAPPER_PREFIX = re.compile(r"^(?:module\.|_orig_mod\.)+")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented, key-sorted JSON via a temporary name and an atomic rename."""
    data = (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    return atomic_write(path, lambda f: f.write(data))


def plain_state_dict(backbone: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Flat official-layout state dict of float32, contiguous CPU tensors.

    Gathers DTensor (FSDP2) shards with ``full_tensor()`` — a collective, so every rank must call
    this — and drops wrapper prefixes (``module.``, ``_orig_mod.``) and FSDP block chunks.
    """
    sd = backbone.state_dict() if isinstance(backbone, nn.Module) else dict(backbone)
    out: dict[str, Tensor] = {}
    for k, v in flatten_block_chunks({_WRAPPER_PREFIX.sub("", k): v for k, v in sd.items()}).items():
        v = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = v.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def _mlp_ratio(width: int, dim: int) -> float:
    """A ratio r with ``int(dim * r) == width`` (the hidden-width formula of both ViT implementations)."""
    r = width / dim
    return r if int(dim * r) == width else (width + 0.5) / dim


def _swiglu_mlp_ratio(hidden: int, dim: int) -> float:
    """A ratio r with ``swiglu_hidden(int(dim * r)) == hidden`` (our/official fused SwiGLU width)."""
    if swiglu_hidden(int(dim * 4.0)) == hidden:
        return 4.0
    for width in range(max(1, (3 * (hidden - 8)) // 2), (3 * hidden) // 2 + 3):
        if swiglu_hidden(width) == hidden:
            return _mlp_ratio(width, dim)
    raise ValueError(f"no mlp_ratio gives a fused SwiGLU hidden width of {hidden}")


def infer_backbone_kwargs(sd: Mapping[str, Tensor]) -> dict[str, Any]:
    """Constructor kwargs read from official-layout weights: sizes, depth, registers, FFN, LayerScale, biases.

    ``num_heads`` is not in the shapes; it comes from the arch (see ``load_backbone``).
    """
    for key in ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.norm1.weight"):
        if key not in sd:
            raise ValueError(f"not a DINOv2 backbone state dict: no {key!r} (keys start with {sorted(sd)[:5]})")
    dim = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    n_pos = sd["pos_embed"].shape[1] - 1
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed holds {n_pos} patch positions, not a square grid")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    swiglu = "blocks.0.mlp.w12.weight" in sd
    if swiglu:
        mlp_ratio = _swiglu_mlp_ratio(sd["blocks.0.mlp.w12.weight"].shape[0] // 2, dim)
    else:
        mlp_ratio = _mlp_ratio(sd["blocks.0.mlp.fc1.weight"].shape[0], dim)
    registers = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    return {
        "embed_dim": dim,
        "depth": depth,
        "patch_size": patch,
        "img_size": grid * patch,
        "mlp_ratio": mlp_ratio,
        "ffn_layer": "swiglufused" if swiglu else "mlp",
        "num_register_tokens": registers,
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
    }


def timm_spec(backbone: DinoVisionTransformer, arch: str) -> tuple[str, dict[str, Any]]:
    """timm model name and JSON-able ``create_model`` kwargs that rebuild ``backbone`` in timm.

    All sizes are explicit, so the name only picks timm's DINOv2 family (and its pretrained cfg).
    ``mlp_layer`` names a class of ``timm.layers`` (resolved by ``create_timm_model``).
    """
    sd = backbone.state_dict()
    info = infer_backbone_kwargs(sd)
    if info["ffn_bias"] != info["proj_bias"]:
        raise ValueError("timm's ViT ties the FFN bias to proj_bias; ffn_bias != proj_bias has no timm equivalent")
    regs = info["num_register_tokens"]
    swiglu = info["ffn_layer"] != "mlp"
    width = sd["blocks.0.mlp.w12.weight" if swiglu else "blocks.0.mlp.fc1.weight"].shape[0]
    name = timm_model_name(arch, regs) if arch in _TIMM_SIZES and regs in (0, 4) else (
        f"vit_small_patch14{'_reg4' if regs else ''}_dinov2")
    kwargs: dict[str, Any] = {
        "img_size": info["img_size"],
        "patch_size": info["patch_size"],
        "embed_dim": info["embed_dim"],
        "depth": info["depth"],
        "num_heads": backbone.num_heads,
        "mlp_ratio": _mlp_ratio(width, info["embed_dim"]),
        "mlp_layer": "SwiGLUPacked" if swiglu else "Mlp",
        "act_layer": "silu" if swiglu else "gelu",
        "init_values": info["init_values"] or 0.0,  # timm.create_model drops None kwargs; 0 = no LayerScale
        "qkv_bias": info["qkv_bias"],
        "proj_bias": info["proj_bias"],
        "reg_tokens": regs,
        "no_embed_class": bool(regs),
        "num_classes": 0,
    }
    return name, kwargs


def create_timm_model(model_name: str, kwargs: Mapping[str, Any], **overrides: Any) -> nn.Module:
    """``timm.create_model(model_name, pretrained=False, **kwargs)`` with ``mlp_layer`` names resolved."""
    import timm
    import timm.layers

    kw = {**kwargs, **overrides}
    if isinstance(kw.get("mlp_layer"), str):
        kw["mlp_layer"] = getattr(timm.layers, kw["mlp_layer"])
    return timm.create_model(model_name, pretrained=False, **kw)


def export_backbone(
    backbone: nn.Module | Mapping[str, Tensor],
    out_dir: str | Path,
    *,
    arch: str,
    backbone_kwargs: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write ``backbone.pth`` (official layout), ``backbone_timm.pth`` (timm layout) and ``model.json``.

    ``arch`` and ``backbone_kwargs`` must rebuild the backbone (``build_backbone(arch, **kwargs)``);
    this is checked against the weights. ``extra`` (e.g. ``dataset_fingerprint``, ``step``) is merged
    into model.json. Every file is written atomically and model.json last, so its presence means
    the export is complete. Returns ``{"backbone", "timm", "meta"}`` paths (no "timm" when the
    architecture has no timm equivalent; model.json then says why).
    """
    out_dir = Path(out_dir)
    sd = plain_state_dict(backbone)
    kwargs = dict(backbone_kwargs)
    try:
        json.dumps(kwargs)
    except TypeError as e:
        raise ValueError(f"backbone_kwargs must be JSON-serialisable to be re-loadable: {e}") from e
    with torch.device("meta"):
        ref = build_backbone(arch, **kwargs)
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if expected != got:
        diff = sorted(set(expected.items()) ^ set(got.items()))[:6]
        raise ValueError(f"weights do not match build_backbone({arch!r}, **backbone_kwargs); differences: {diff}")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "arch": arch,
        "backbone_kwargs": kwargs,
        "patch_size": ref.patch_size,
        "embed_dim": ref.embed_dim,
        "depth": ref.n_blocks,
        "num_heads": ref.num_heads,
        "ffn_layer": kwargs.get("ffn_layer", "mlp" if "blocks.0.mlp.fc1.weight" in sd else "swiglufused"),
        "num_register_tokens": ref.num_register_tokens,
        "img_size": ref.patch_embed.img_size[0],
        "layerscale": kwargs.get("init_values", 1e-5) if "blocks.0.ls1.gamma" in sd else None,
        "interpolate_antialias": ref.interpolate_antialias,
        "interpolate_offset": ref.interpolate_offset,
        "files": {"backbone": BACKBONE_FILE},
    }
    clash = sorted(set(meta) & set(extra or {}))
    if clash:
        raise ValueError(f"extra must not override the architecture fields {clash}")
    paths = {"backbone": atomic_write(out_dir / BACKBONE_FILE, lambda f: torch.save(sd, f))}
    try:
        name, timm_kwargs = timm_spec(ref, arch)
    except ValueError as e:
        meta["timm"] = {"error": str(e)}
    else:
        timm_sd = to_timm_state_dict(sd, num_register_tokens=ref.num_register_tokens)
        paths["timm"] = atomic_write(out_dir / TIMM_FILE, lambda f: torch.save(timm_sd, f))
        meta["files"]["timm"] = TIMM_FILE
        meta["timm"] = {
            "model_name": name,
            "kwargs": timm_kwargs,
            "note": "create with pretrained=False and these kwargs (mlp_layer is a timm.layers class name); "
            "features equal ours at img_size. Position-embedding resizing for other sizes differs "
            "(ours: official bicubic with interpolate_offset/antialias).",
        }
    meta["sha256"] = {key: _sha256(p) for key, p in paths.items()}
    meta.update(extra or {})
    paths["meta"] = write_json_atomic(out_dir / META_FILE, meta)
    return paths


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_export_meta(export_dir: str | Path) -> dict[str, Any]:
    """The model.json of an export directory (clear error when it is not one)."""
    meta_path = Path(export_dir) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: expected a directory written by export_backbone ({BACKBONE_FILE} + {META_FILE}), "
            "or the path of an official checkpoint file such as dinov2_vits14_pretrain.pth"
        )
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a {FORMAT} description (format={meta.get('format')!r})")
    return meta


def load_timm_backbone(export_dir: str | Path) -> nn.Module:
    """The timm model of an export directory, weights loaded with strict=True, in eval mode."""
    meta = read_export_meta(export_dir)
    if "model_name" not in meta.get("timm", {}):
        raise ValueError(f"{export_dir} has no timm file: {meta.get('timm', {}).get('error')}")
    model = create_timm_model(meta["timm"]["model_name"], meta["timm"]["kwargs"])
    path = Path(export_dir) / meta["files"]["timm"]
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return model.eval()


def _load_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights {path} not found")
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ValueError(f"{path} is not a plain state dict of tensors (top-level keys: {list(sd)[:5]})")
    return plain_state_dict(sd)


def load_backbone(path_or_dir: str | Path, arch: str | None = None, **overrides: Any) -> DinoVisionTransformer:
    """A backbone (eval mode) from an export directory, or from an official-layout ``.pth`` file.

    Export directory (or its model.json / backbone.pth): built from model.json. Official file
    (e.g. ``dinov2_vits14_pretrain.pth``): sizes, depth, registers, SwiGLU, LayerScale and biases
    are read from the shapes; the arch (for the number of heads) is inferred from the embed dim
    unless given (a non-standard width needs ``embed_dim``/``num_heads`` overrides). Checkpoints
    with registers get the hub's interpolation settings (antialias, offset 0). ``overrides`` go to
    the constructor. Weights load with strict=True.
    """
    path = Path(path_or_dir)
    if path.is_file() and path.name == META_FILE:
        path = path.parent
    elif path.is_file() and path.name == BACKBONE_FILE and (path.parent / META_FILE).is_file():
        path = path.parent
    if path.is_dir():
        meta = read_export_meta(path)
        if arch is not None and arch != meta["arch"]:
            raise ValueError(f"{path} holds a {meta['arch']} backbone, not {arch}")
        model = build_backbone(meta["arch"], **{**meta["backbone_kwargs"], **overrides})
        sd = _load_state_dict(path / meta["files"]["backbone"])
    elif path.is_file():
        sd = _load_state_dict(path)
        kwargs = infer_backbone_kwargs(sd)
        if arch is None:
            if kwargs["embed_dim"] not in _ARCH_BY_DIM:
                raise ValueError(f"cannot infer the arch of {path} (embed dim {kwargs['embed_dim']}); pass arch=")
            arch = _ARCH_BY_DIM[kwargs["embed_dim"]]
        with torch.device("meta"):
            arch_dim = build_backbone(arch, depth=1).embed_dim
        if arch_dim != kwargs["embed_dim"] and "embed_dim" not in overrides:
            raise ValueError(f"{path} has embed dim {kwargs['embed_dim']}, but {arch} has {arch_dim}")
        if kwargs["num_register_tokens"]:
            kwargs.update(interpolate_antialias=True, interpolate_offset=0.0)
        model = build_backbone(arch, **{**kwargs, **overrides})
    else:
        raise FileNotFoundError(
            f"{path} not found: expected an export directory ({BACKBONE_FILE} + {META_FILE}) "
            "or an official checkpoint file such as dinov2_vits14_pretrain.pth"
        )
    model.load_state_dict(sd, strict=True)
    return model.eval()
