"""A small ImageFolder-style dataset: every image file under a folder, optionally with a transform.

Layout: ``root/<class>/<file>`` gives class labels (sorted class names → 0..C-1); image files
directly in ``root`` get label 0 (no classes needed for self-supervised training). Files are
listed recursively, sorted, so the order is deterministic. Items are ``(transform(image), label)``
— the shape ``collate_data_and_cast`` expects for the SSL collate (the augmentation dict, target).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_images(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Decode to RGB; if ``max_side`` is set, downscale (bicubic) so the longer side is at most that."""
    with Image.open(path) as im:
        im = im.convert("RGB")
    if max_side is not None and max(im.size) > max_side:
        s = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BICUBIC)
    return im


class ImageFolderDataset(Dataset):
    """``(transform(image), label)`` for every image under ``root``.

    ``cache=True`` keeps decoded images in memory (a small folder is decoded once).
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        max_side: int | None = None,
        cache: bool = True,
    ) -> None:
        self.root = Path(root)
        self.paths = list_images(self.root)
        if not self.paths:
            raise ValueError(f"no image files under {self.root}")
        classes = sorted({p.parent.relative_to(self.root).parts[0] for p in self.paths if p.parent != self.root})
        self.classes = classes
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [
            0 if p.parent == self.root else self.class_to_idx[p.parent.relative_to(self.root).parts[0]] for p in self.paths
        ]
        self.transform = transform
        self.max_side = max_side
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        im = load_rgb(self.paths[index], self.max_side)
        if self._cache is not None:
            self._cache[index] = im
        return im

    def __getitem__(self, index: int) -> tuple[Any, int]:
        im = self.load(index)
        return (self.transform(im) if self.transform is not None else im), self.targets[index]
