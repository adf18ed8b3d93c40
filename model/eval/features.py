"""Frozen-backbone features of labelled image folders (ImageFolder layout) for kNN / linear evaluation.

Transform (the standard DINOv2 eval one): resize the shorter side to ``resize`` (bicubic; by
default ``round(crop_size · 256/224)``, i.e. 256 for 224 crops), centre-crop ``crop_size``, ImageNet
normalisation. Features are taken in eval mode without gradients: the CLS token after the final
norm (``x_norm_clstoken``), or that concatenated with the mean of the normed patch tokens
(``"cls+avgpool"``, the input of DINOv2's linear evaluation).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from model.data.augmentations import make_normalize_transform
from model.data.datasets import ImageFolderDataset

POOLINGS = ("cls", "cls+avgpool")


def default_resize(crop_size: int) -> int:
    """Shorter-side resize for a centre crop: 256 for 224, the same 256/224 ratio otherwise."""
    return int(round(crop_size * 256 / 224))


def make_eval_transform(crop_size: int = 224, resize: int | None = None) -> v2.Transform:
    """PIL image → normalised float tensor [3, crop, crop]: resize shorter side, centre crop, ImageNet norm."""
    if crop_size <= 0:
        raise ValueError(f"crop_size must be positive, got {crop_size}")
    resize = default_resize(crop_size) if resize is None else resize
    if resize < crop_size:
        raise ValueError(f"resize ({resize}) must be >= crop_size ({crop_size})")
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(resize, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(crop_size),
            v2.ToDtype(torch.float32, scale=True),
            make_normalize_transform(),
        ]
    )


class LabelledFolder(Dataset):
    """``(transform(image), label)`` for ``root/<class>/<image>``; labels index ``classes``.

    ``classes`` (e.g. the training set's class names) fixes the label mapping; every class folder
    of ``root`` must be among them. Without it, the sorted class folder names are used.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.root = Path(root)
        inner = ImageFolderDataset(self.root, transform, cache=False)  # raises on a missing or empty folder
        loose = [p for p in inner.paths if p.parent == self.root]
        if not inner.classes:
            raise ValueError(f"no class folders under {self.root}: expected the layout {self.root}/<class>/<image>")
        if loose:
            raise ValueError(f"{len(loose)} image(s) directly under {self.root} (e.g. {loose[0].name}); "
                             f"expected every image in a class folder {self.root}/<class>/<image>")
        self.classes = list(inner.classes) if classes is None else list(classes)
        unknown = sorted(set(inner.classes) - set(self.classes))
        if unknown:
            raise ValueError(f"classes of {self.root} not among the training classes: {unknown[:10]}"
                             f"{' ...' if len(unknown) > 10 else ''}")
        index = {c: i for i, c in enumerate(self.classes)}
        self.targets = [index[inner.classes[t]] for t in inner.targets]
        self._inner = inner

    def __len__(self) -> int:
        return len(self._inner)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self._inner[i][0], self.targets[i]


class _Transformed(Dataset):
    """Applies ``transform`` to items that are still PIL images (datasets given without a transform)."""

    def __init__(self, dataset: Dataset, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x, y = self.dataset[i]
        return (self.transform(x) if isinstance(x, Image.Image) else x), int(y)


def pool_features(out: dict[str, torch.Tensor], pooling: str = "cls") -> torch.Tensor:
    """``x_norm_clstoken`` ("cls") or its concatenation with the mean normed patch token ("cls+avgpool")."""
    if pooling == "cls":
        return out["x_norm_clstoken"]
    if pooling == "cls+avgpool":
        return torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1)], dim=1)
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def embed_batches(
    backbone: nn.Module,
    loader: Any,
    *,
    device: torch.device,
    pooling: str = "cls",
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone.forward_features`` over ``(images, labels)`` batches → float32 CPU features, int64 labels."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
    feats, labels = [], []
    for x, y in loader:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = backbone.forward_features(x.to(device, non_blocking=True))
        feats.append(pool_features(out, pooling).float().cpu())
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    if not feats:
        raise ValueError("no images to embed")
    return torch.cat(feats), torch.cat(labels)


def extract_features(
    backbone: nn.Module,
    folder_or_dataset: str | Path | Dataset,
    *,
    crop_size: int = 224,
    resize: int | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    pooling: str = "cls",
    bf16: bool = False,
    classes: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Features ``[N, D]`` float32, labels ``[N]`` int64 and class names of a labelled image folder.

    A folder is read as ``root/<class>/<image>`` with the eval transform; ``classes`` (the training
    classes) fixes the label indices, and a class outside it is an error. A dataset must yield
    ``(image, label)`` (PIL images get the eval transform); its ``classes`` attribute is used if present.
    The backbone runs in eval mode without gradients on ``device`` (default: where its parameters
    are), optionally under bf16 autocast; its device and train/eval mode are restored afterwards.
    """
    transform = make_eval_transform(crop_size, resize)
    patch = getattr(backbone, "patch_size", None)
    if isinstance(patch, int) and crop_size % patch:
        raise ValueError(f"crop_size {crop_size} is not a multiple of the backbone's patch size {patch}")
    if isinstance(folder_or_dataset, (str, Path)):
        dataset: Dataset = LabelledFolder(folder_or_dataset, transform, classes)
        names = list(dataset.classes)  # type: ignore[attr-defined]
    else:
        dataset = _Transformed(folder_or_dataset, transform)
        if len(dataset) == 0:
            raise ValueError("the dataset is empty")
        names = list(classes if classes is not None else getattr(folder_or_dataset, "classes", None) or [])
    home = _model_device(backbone)
    run_on = torch.device(device) if device is not None else home
    was_training = backbone.training
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=run_on.type == "cuda")
    backbone.to(run_on).eval()
    try:
        feats, labels = embed_batches(backbone, loader, device=run_on, pooling=pooling, bf16=bf16)
    finally:
        backbone.to(home).train(was_training)
    if not names:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    if int(labels.min()) < 0 or int(labels.max()) >= len(names):
        raise ValueError(f"labels must lie in [0, {len(names)}), got [{int(labels.min())}, {int(labels.max())}]")
    return feats, labels, names
