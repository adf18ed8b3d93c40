"""Image embedder for the ``embed`` stage: one model, loaded once, batches of encoded images in,
L2-normalised float16 vectors out.

Families (see ``pipeline.embedding.spec``):

* ``open_clip``: ``open_clip.create_model_and_transforms(arch, pretrained=<resolved file | None>)``
  with the preprocessing of the pretrained tag (mean, std, interpolation, resize mode);
  features = ``model.encode_image`` (the visual tower only is kept for plain CLIP models).
* ``dinov2``: ``model.layers.vit`` backbone, strict load of the checkpoint (official layout; also
  ``{"teacher"|"model"|"state_dict": ...}`` wrappers, ``teacher.backbone.`` / ``backbone.`` /
  ``student.backbone.`` prefixes, ``module.`` / ``_orig_mod.`` and FSDP block chunks); features = CLS
  token after the final norm. Preprocessing: resize 256 (bicubic), centre crop 224, ImageNet mean/std
  (``image_size`` S: crop S, resize round(S·256/224), S a multiple of the patch size).
* ``timm``: ``timm.create_model(name, num_classes=0)`` with the checkpoint or cached hub file
  loaded through timm's own ``load_pretrained`` (its checkpoint filter, strict), and timm's eval
  transforms for the model's data config. ``timm:<name>:package`` (weights shipped in an installed
  package, ``pipeline.embedding.packaged``): the file's state dict is converted to timm's layout
  by the checked ``convert_by_order``, loaded strictly, and the transforms use the mean/std the
  weights were trained with.

The weights are checked (``resolve_weights``) before anything is built: missing weights raise
``WeightsUnavailable``; random weights only for an explicit ``none``, from a fixed seed (the global
RNG state is restored afterwards), so every actor builds the same model. Features are computed
under autocast (bf16 on CUDA, fp16 where bf16 is unsupported; fp32 on CPU), normalised in fp32,
then cast to float16. An undecodable image gives a row of NaN.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from pipeline.embedding.spec import AUTO, ModelSpec, parse_spec
from pipeline.embedding.weights import ResolvedWeights, resolve_weights, weights_digest
from pipeline.imaging import ALLOWED_FORMATS, exif_transpose, to_rgb

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SEED",
    "Embedder",
    "decode_image",
    "dinov2_transform",
    "extract_backbone_state_dict",
    "infer_dinov2_arch",
    "load_dinov2_checkpoint",
]

SEED = 0  # random-init seed: identical weights in every actor
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WRAPPERS = ("teacher", "model", "state_dict", "module")
_BACKBONE_PREFIXES = ("teacher.backbone.", "backbone.", "student.backbone.")

Preprocess = Callable[[Image.Image], torch.Tensor]


def decode_image(data: bytes) -> Image.Image | None:
    """Encoded bytes → RGB PIL image (EXIF orientation applied), or None if undecodable."""
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as im:
            im.load()
            return to_rgb(exif_transpose(im))
    except Exception:  # noqa: BLE001 - any undecodable input becomes a NaN row
        return None


# ------------------------------------------------------------------------------------- dinov2


def _has_tensors(obj: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def extract_backbone_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The backbone state dict (official key layout) inside a checkpoint object.

    Unwraps ``teacher`` / ``model`` / ``state_dict`` / ``module`` containers, strips ``module.`` and
    ``_orig_mod.``, keeps the teacher backbone of a training checkpoint (else ``backbone.``, else
    the student's), and flattens FSDP block chunks ``blocks.<chunk>.<i>.`` → ``blocks.<i>.``.
    """
    from model.export import flatten_block_chunks

    while isinstance(obj, Mapping):  # a state dict never holds a mapping: unwrap containers
        key = next((k for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping) or not _has_tensors(obj):
        keys = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"no state dict in checkpoint (found: {keys})")
    sd = {k.replace("_orig_mod.", "").removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    return flatten_block_chunks(sd)


def load_dinov2_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Load a ``.pth``/``.pt`` (``weights_only``) or ``.safetensors`` file → backbone state dict."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: Any = load_file(path, device="cpu")
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return extract_backbone_state_dict(obj)


_ARCH_DIMS: dict[str, tuple[int, int, int]] = {}


def _arch_dims() -> dict[str, tuple[int, int, int]]:
    """(embed_dim, depth, num_heads) of every registered backbone factory (built on the meta device)."""
    if not _ARCH_DIMS:
        from model.layers.vit import BACKBONES

        with torch.device("meta"):
            for name, factory in BACKBONES.items():
                m = factory()
                _ARCH_DIMS[name] = (m.embed_dim, m.n_blocks, m.num_heads)
    return _ARCH_DIMS


def infer_dinov2_arch(sd: Mapping[str, torch.Tensor], arch: str = AUTO) -> tuple[str, dict[str, Any]]:
    """(arch, build_backbone kwargs) reproducing the state dict's shapes.

    Embed dim and depth pick the arch (or must match the given one); patch size, position grid
    (img_size), registers, SwiGLU vs MLP (and MLP width), LayerScale and biases come from the keys
    and shapes. With registers the official hub interpolation settings (antialias, offset 0) are
    used; they only matter when the input grid differs from the checkpoint's.
    """
    try:
        dim = int(sd["cls_token"].shape[-1])
        patch = int(sd["patch_embed.proj.weight"].shape[-1])
        n_pos = int(sd["pos_embed"].shape[1]) - 1
    except KeyError as exc:
        raise ValueError(f"not a DINOv2 ViT state dict: missing {exc} (keys: {sorted(sd)[:12]}...)") from None
    blocks = {int(k.split(".")[1]) for k in sd if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    depth = max(blocks) + 1 if blocks else 0
    grid = math.isqrt(n_pos)
    if grid * grid != n_pos:
        raise ValueError(f"pos_embed has {n_pos} patch positions, not a square grid")
    matches = [name for name, (d, n, _) in _arch_dims().items() if (d, n) == (dim, depth)]
    if arch == AUTO:
        if not matches:
            known = {name: dims[:2] for name, dims in _arch_dims().items()}
            raise ValueError(f"checkpoint has embed dim {dim} and {depth} blocks: no backbone matches "
                             f"(known (dim, depth): {known})")
        arch = matches[0]
    elif arch not in matches:
        d, n, _ = _arch_dims()[arch]
        found = f" (that is {matches[0]})" if matches else ""
        raise ValueError(f"checkpoint has embed dim {dim} and {depth} blocks{found}, but the spec says {arch} "
                         f"(dim {d}, {n} blocks)")
    swiglu = "blocks.0.mlp.w12.weight" in sd
    registers = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    kwargs: dict[str, Any] = {
        "img_size": grid * patch,
        "patch_size": patch,
        "num_register_tokens": registers,
        "ffn_layer": "swiglufused" if swiglu else "mlp",
        "init_values": 1e-5 if "blocks.0.ls1.gamma" in sd else None,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "proj_bias": "blocks.0.attn.proj.bias" in sd,
        "ffn_bias": ("blocks.0.mlp.w12.bias" if swiglu else "blocks.0.mlp.fc1.bias") in sd,
    }
    if not swiglu and "blocks.0.mlp.fc1.weight" in sd:
        kwargs["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / dim
    if registers:
        kwargs.update(interpolate_antialias=True, interpolate_offset=0.0)
    return arch, kwargs


def dinov2_transform(image_size: int | None = None, patch_size: int = 14) -> Preprocess:
    """DINOv2 eval preprocessing: resize 256 bicubic, centre crop 224, ImageNet normalisation."""
    from torchvision import transforms

    crop = image_size or 224
    if crop % patch_size:
        raise ValueError(f"image_size {crop} is not a multiple of the patch size {patch_size}")
    return transforms.Compose([
        transforms.Resize(round(crop * 256 / 224), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def _load_dinov2(spec: ModelSpec, weights: ResolvedWeights, image_size: int | None) -> tuple[nn.Module, Preprocess]:
    from model.layers.vit import build_backbone

    if weights.path is None:
        model = build_backbone(spec.arch)
    else:
        sd = load_dinov2_checkpoint(weights.path)
        arch, kwargs = infer_dinov2_arch(sd, spec.arch)
        model = build_backbone(arch, **kwargs)
        model.load_state_dict(sd, strict=True)
    return model, dinov2_transform(image_size, model.patch_size)


# ------------------------------------------------------------------------------------- open_clip


class _EncodeImage(nn.Module):
    """``model.encode_image`` as a module (open_clip models other than plain CLIP)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model.encode_image(x)
        return out[0] if isinstance(out, tuple) else out


def _load_open_clip(spec: ModelSpec, weights: ResolvedWeights, image_size: int | None) -> tuple[nn.Module, Preprocess]:
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    kwargs: dict[str, Any] = {}
    tag = spec.pretrained_tag
    if tag is not None:  # the preprocessing open_clip would set up for this tag
        cfg = open_clip.pretrained.get_pretrained_cfg(spec.arch, tag)
        for ours, theirs in (("image_mean", "mean"), ("image_std", "std"), ("image_interpolation", "interpolation"),
                             ("image_resize_mode", "resize_mode")):
            if cfg.get(theirs) is not None:
                kwargs[ours] = cfg[theirs]
    if image_size:
        kwargs["force_image_size"] = image_size
    model, _, preprocess = open_clip.create_model_and_transforms(spec.arch, pretrained=weights.path, **kwargs)
    encode_is_visual = type(model).encode_image in (CLIP.encode_image, CustomTextCLIP.encode_image)
    module = model.visual if encode_is_visual else _EncodeImage(model)
    return module, preprocess


# ------------------------------------------------------------------------------------- timm


def _load_timm(spec: ModelSpec, weights: ResolvedWeights, image_size: int | None) -> tuple[nn.Module, Preprocess]:
    size_kw: dict[str, Any] = {"img_size": image_size} if image_size else {}
    try:
        return _build_timm(spec, weights, size_kw, image_size)
    except TypeError as exc:
        if size_kw and "img_size" in str(exc):
            raise ValueError(f"timm model {spec.arch} does not take an image_size ({exc})") from exc
        raise


def _build_timm(spec: ModelSpec, weights: ResolvedWeights, size_kw: dict[str, Any],
                image_size: int | None) -> tuple[nn.Module, Preprocess]:
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg, load_state_dict

    mean_std: dict[str, Any] = {}
    if weights.path is None:
        model = timm.create_model(spec.arch, pretrained=False, num_classes=0, **size_kw)
    elif weights.packaged:
        model, mean_std = _load_packaged(spec, weights.path, size_kw)
    elif weights.custom_load:  # e.g. .npz weights: the model's own loader, as timm does
        model = timm.create_model(spec.arch, pretrained=True, pretrained_cfg_overlay={"file": weights.path}, **size_kw)
        model.reset_classifier(0)
    else:
        sd = load_state_dict(weights.path)
        cfg = get_pretrained_cfg(spec.arch)
        classifiers = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
        heads = [sd[f"{c}.weight"] for c in classifiers if f"{c}.weight" in sd]
        num_classes = int(heads[0].shape[0]) if heads else 0
        # timm's own load path (checkpoint filter, input-conv adaptation) with strict loading: the
        # model is built with the checkpoint's head size, which is then dropped.
        overlay = {"state_dict": sd, "num_classes": num_classes, "label_offset": None}
        model = timm.create_model(spec.arch, pretrained=True, num_classes=num_classes,
                                  pretrained_cfg_overlay=overlay, **size_kw)
        for cfg_dict in {id(d): d for d in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None))
                         if isinstance(d, dict)}.values():
            cfg_dict.pop("state_dict", None)  # do not keep a second copy of the weights alive
        if num_classes:
            model.reset_classifier(0)
    data_cfg = resolve_data_config({"input_size": (3, image_size, image_size)} if image_size else {}, model=model)
    return model, create_transform(**{**data_cfg, **mean_std}, is_training=False)


def _load_packaged(spec: ModelSpec, path: str, size_kw: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A timm model with the packaged weights at ``path`` (checked conversion, strict load), head dropped."""
    import timm

    from pipeline.embedding.packaged import convert_by_order, packaged_weights

    entry = packaged_weights(spec.arch)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    heads = [v for k, v in sd.items() if k.endswith(".weight") and v.ndim == 2]
    num_classes = int(heads[-1].shape[0]) if heads else 0
    model = timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **size_kw)
    model.load_state_dict(convert_by_order(sd, model.state_dict()), strict=True)
    if num_classes:
        model.reset_classifier(0)
    return model, {"mean": entry.mean, "std": entry.std}


_LOADERS: dict[str, Callable[[ModelSpec, ResolvedWeights, int | None], tuple[nn.Module, Preprocess]]] = {
    "open_clip": _load_open_clip,
    "dinov2": _load_dinov2,
    "timm": _load_timm,
}


# ------------------------------------------------------------------------------------- Embedder


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _pick_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


class Embedder:
    """Loads the model once; embeds batches of encoded images (bytes) into L2-normalised float16 vectors.

    Attributes: ``spec`` (ModelSpec), ``dim``, ``model_id`` (canonical spec + ``@sha256:<16 hex>`` of
    the weights file, or ``@random-init:<seed>``), ``weights_source`` (``check_weights``' text),
    ``device``, ``precision``, ``model`` (the nn.Module: images → features), ``preprocess``
    (PIL RGB image → CHW float tensor).
    """

    def __init__(self, spec: str | ModelSpec, device: str = "auto", precision: str = "auto",
                 image_size: int | None = None) -> None:
        self.spec = parse_spec(spec)
        weights = resolve_weights(self.spec)  # before any work: WeightsUnavailable / ValueError
        self.weights_source = weights.description
        self.device = _pick_device(device)
        self.precision = _pick_precision(precision, self.device)
        digest = f"sha256:{weights_digest(weights.path)[:16]}" if weights.path else f"random-init:{SEED}"
        self.model_id = f"{self.spec}@{digest}"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model, self.preprocess = _LOADERS[self.spec.family](self.spec, weights, image_size)
        self.model = model.to(self.device).eval().requires_grad_(False)
        probe = self.preprocess(Image.new("RGB", (64, 48), (128, 128, 128)))
        self.dim = int(self._features(probe.unsqueeze(0)).shape[-1])

    def __repr__(self) -> str:
        return f"Embedder({self.model_id!r}, device={self.device}, precision={self.precision}, dim={self.dim})"

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        """Model features in fp32 for a preprocessed batch [n, 3, H, W]."""
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=_DTYPES.get(self.precision),
                                                    enabled=self.precision != "fp32"):
            out = self.model(x)
        return out.float().reshape(out.shape[0], -1)

    def embed_tensor(self, x: torch.Tensor) -> np.ndarray:
        """Preprocessed batch [n, 3, H, W] → float16 [n, dim], rows L2-normalised (in fp32)."""
        return F.normalize(self._features(x), dim=-1).to(torch.float16).cpu().numpy()

    def embed(self, images: list[bytes]) -> np.ndarray:
        """Encoded images → float16 [n, dim], rows L2-normalised; undecodable images → NaN rows."""
        out = np.full((len(images), self.dim), np.nan, dtype=np.float16)
        tensors, rows = [], []
        for i, data in enumerate(images):
            im = decode_image(data) if data else None
            if im is not None:
                tensors.append(self.preprocess(im))
                rows.append(i)
        if rows:
            out[rows] = self.embed_tensor(torch.stack(tensors))
        return out


def embedding_dim(spec: str | ModelSpec) -> int:
    """The output dimension of a spec's model, without loading its weights (configs / meta device)."""
    spec = parse_spec(spec)
    if spec.family == "open_clip":
        import open_clip

        cfg = open_clip.get_model_config(spec.arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip model {spec.arch!r}")
        return int(cfg["embed_dim"])
    if spec.family == "timm":
        import timm

        with torch.device("meta"):
            model = timm.create_model(spec.arch, pretrained=False, num_classes=0)
        # the pooled output: after the head's hidden layer where there is one (MobileNetV3: 288 → 1024)
        return int(getattr(model, "head_hidden_size", None) or model.num_features)
    if spec.arch != AUTO:
        from model.layers.vit import build_backbone

        with torch.device("meta"):
            return int(build_backbone(spec.arch).embed_dim)
    sd = torch.load(spec.checkpoint, map_location="meta", mmap=True, weights_only=True)
    return int(extract_backbone_state_dict(sd)["cls_token"].shape[-1])
