"""Optimizer parameter groups: layer-wise lr decay, patch-embed lr multiplier, no weight decay
for biases / norms / LayerScale gammas / tokens, and a last-layer flag (official DINOv2
``dinov2/utils/param_groups.py`` semantics).

Each parameter gets ``lr_multiplier``, ``wd_multiplier`` and ``is_last_layer``;
``fuse_params_groups`` merges parameters with equal values into one optimizer group. The
training loop sets ``group["lr"] = (last_layer_lr if is_last_layer else lr) * lr_multiplier``
and ``group["weight_decay"] = wd * wd_multiplier`` every iteration
(``model.ssl.schedules.apply_optim_scheduler``).

Layer ids for a backbone with ``depth`` blocks: ``patch_embed``, ``pos_embed``,
``cls_token``, ``mask_token``, ``register_tokens`` → 0; ``blocks.i`` → i + 1; everything
else (final ``norm``) → depth + 1. ``lr_multiplier = decay ** (depth + 1 - layer_id)``.
Heads (no blocks) get 1.0.

One deliberate difference from the official rule: the official code only exempts names
ending in ``.bias`` or containing ``norm`` / ``gamma`` from weight decay, so its
``cls_token`` / ``pos_embed`` / ``mask_token`` / ``register_tokens`` ARE decayed. We also
exempt those tokens (``exempt_tokens_from_wd=True``, pass ``False`` for the official rule).
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable

from torch import nn

TOKEN_NAMES = ("pos_embed", "cls_token", "mask_token", "register_tokens")
LAYER0_NAMES = ("patch_embed",) + TOKEN_NAMES


def _strip_wrappers(name: str) -> str:
    for prefix in ("_fsdp_wrapped_module.", "_orig_mod.", "module."):
        name = name.replace(prefix, "")
    return name


def get_vit_lr_decay_rate(name: str, lr_decay_rate: float = 1.0, num_layers: int = 12, is_backbone: bool = True) -> float:
    """``lr_decay_rate ** (num_layers + 1 - layer_id)`` for a backbone parameter name."""
    layer_id = num_layers + 1
    if is_backbone:
        parts = name.split(".")
        if any(p in LAYER0_NAMES for p in parts):
            layer_id = 0
        elif "blocks" in parts and "residual" not in parts:
            i = parts.index("blocks")
            idx = parts[i + 1]
            if not idx.isdigit():
                raise ValueError(f"cannot read the block index of {name!r}")
            # chunked blocks (blocks.<chunk>.<i>.…) keep the global index in the second position
            if i + 2 < len(parts) and parts[i + 2].isdigit():
                idx = parts[i + 2]
            layer_id = int(idx) + 1
    return lr_decay_rate ** (num_layers + 1 - layer_id)


def _num_blocks(model: nn.Module) -> int:
    if hasattr(model, "n_blocks"):
        return int(model.n_blocks)
    if hasattr(model, "blocks"):
        blocks = model.blocks
        if len(blocks) and isinstance(blocks[0], nn.ModuleList):  # chunked
            return sum(len(c) for c in blocks)
        return len(blocks)
    if hasattr(model, "backbone"):
        return _num_blocks(model.backbone)
    return 0


def get_params_groups_with_decay(
    model: nn.Module,
    lr_decay_rate: float = 1.0,
    patch_embed_lr_mult: float = 1.0,
    *,
    exempt_tokens_from_wd: bool = True,
    prefix: str = "",
) -> list[dict[str, Any]]:
    """One dict per trainable parameter: params, name, lr_multiplier, wd_multiplier, is_last_layer."""
    n_blocks = _num_blocks(model)
    out: list[dict[str, Any]] = []
    for raw_name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        name = _strip_wrappers(raw_name)
        parts = name.split(".")
        d: dict[str, Any] = {
            "params": param,
            "name": prefix + name,
            "is_last_layer": "last_layer" in name,
            "lr_multiplier": get_vit_lr_decay_rate(name, lr_decay_rate, num_layers=n_blocks, is_backbone=n_blocks > 0),
            "wd_multiplier": 1.0,
        }
        if name.endswith(".bias") or "norm" in name or "gamma" in name:
            d["wd_multiplier"] = 0.0
        if exempt_tokens_from_wd and any(p in TOKEN_NAMES for p in parts):
            d["wd_multiplier"] = 0.0
        if "patch_embed" in parts:
            d["lr_multiplier"] *= patch_embed_lr_mult
        out.append(d)
    return out


def fuse_params_groups(
    all_params_groups: Iterable[dict[str, Any]], keys: tuple[str, ...] = ("lr_multiplier", "wd_multiplier", "is_last_layer")
) -> list[dict[str, Any]]:
    """Merge parameters whose ``keys`` are equal into one optimizer group (order of first appearance)."""
    fused: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"params": [], "names": []})
    for d in all_params_groups:
        ident = tuple(d[k] for k in keys)
        g = fused[ident]
        for k in keys:
            g[k] = d[k]
        g["params"].append(d["params"])
        g["names"].append(d.get("name", ""))
    return list(fused.values())
