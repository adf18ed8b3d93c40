"""Convert backbone state dicts between the official DINOv2 layout (ours) and timm's `vit_*_patch14_dinov2`."""

from __future__ import annotations

import re

from torch import Tensor

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
