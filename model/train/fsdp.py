"""FSDP2 sharding of the student/teacher modules (``torch.distributed.fsdp.fully_shard``).

Each transformer block, and each head's prototype layer (65k–131k × 256–384 weights, most of a
head), is its own FSDP unit (its parameters are all-gathered just before it runs and freed
after), then each top-level module (backbone, DINO head, iBOT head) is
sharded as the root of its blocks. Student and teacher are sharded identically, so the EMA
update works shard by shard (``model.ssl.ema`` uses the DTensors' local shards).

The backbone is called through ``forward_features`` / ``forward_features_list`` rather than
``forward``; those methods are registered with FSDP so the root parameters (patch embedding,
tokens, final norm) are gathered around them too.

Mixed precision: ``param_dtype`` bf16 with fp32 gradient reduction on GPU by default
(``MixedPrecisionPolicy``); on CPU the parameters stay fp32 and the forward passes run under
bf16 autocast (see ``SSLMetaArch.autocast``).
"""
from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

FORWARD_METHODS = ("forward_features", "forward_features_list")

PrecisionName = Literal["auto", "bf16", "fp32"]


def mixed_precision_policy(name: PrecisionName, device_type: str) -> MixedPrecisionPolicy:
    """``bf16`` → bf16 parameters, fp32 reduce; ``fp32`` → no casting; ``auto`` → bf16 on CUDA, fp32 elsewhere."""
    if name == "auto":
        name = "bf16" if device_type == "cuda" else "fp32"
    if name == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if name == "fp32":
        return MixedPrecisionPolicy()
    raise ValueError(f"unknown mixed precision {name!r}; expected auto, bf16 or fp32")


def device_mesh(world_size: int, device_type: str) -> DeviceMesh:
    """A 1-D mesh over every worker of the initialised process group."""
    return init_device_mesh(device_type, (world_size,))


def shard_module(module: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy,
                 reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` every transformer block (``blocks``) or a head's prototype layer (``last_layer``), then the module."""
    units: list[nn.Module] = list(getattr(module, "blocks", ()))
    if isinstance(getattr(module, "last_layer", None), nn.Module):  # a DINO head: its prototypes are most of it
        units.append(module.last_layer)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    for method in FORWARD_METHODS:
        if hasattr(module, method):
            register_fsdp_forward_method(module, method)
    return module


def shard_student_teacher(student: nn.ModuleDict, teacher: nn.ModuleDict, mesh: DeviceMesh,
                          policy: MixedPrecisionPolicy, extra: Iterable[nn.ModuleDict] = ()) -> None:
    """Shard each top-level module of the student, the teacher and ``extra`` groups (e.g. a student EMA) alike."""
    for modules in (student, teacher, *extra):
        for name in list(modules.keys()):
            shard_module(modules[name], mesh, policy)


def is_sharded(module: nn.Module) -> bool:
    """True when some parameter of ``module`` is a DTensor (i.e. it went through ``fully_shard``)."""
    return any(hasattr(p, "to_local") for p in module.parameters())


def local_numel(module: nn.Module) -> int:
    """Parameter elements held by this process (the local shards when sharded)."""
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in module.parameters())
