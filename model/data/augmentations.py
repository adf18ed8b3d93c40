"""DINOv2 multi-crop augmentation on torchvision.transforms.v2.

One call turns one image into 2 global crops and N local crops (float tensors, ImageNet
normalised). Geometry first (random resized crop + horizontal flip), then photometric
ops on uint8 tensors (colour jitter, grayscale, Gaussian blur, solarisation), then
conversion to float and normalisation.

Gaussian-blur probabilities: we use the DOCUMENTED ones (paper / official config
comments): global crop 1 → 1.0, global crop 2 → 0.1, local crops → 0.5. The official
code (dinov2/data/augmentations.py, ``GaussianBlur``) passes ``1 - p`` to
``RandomApply`` under the mistaken belief that torchvision inverts it, so there
global crop 1 is never blurred (0.0), global crop 2 is blurred with probability 0.9 and
local crops 0.5. We follow the documented values; pass ``blur_probs=(0.0, 0.9, 0.5)``
to reproduce the official code's behaviour.

Randomness comes from torch's global RNG only (torchvision v2), so ``torch.manual_seed``
makes the output deterministic.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# documented (paper / docs) blur probabilities: (global 1, global 2, locals)
DOCUMENTED_BLUR_PROBS = (1.0, 0.1, 0.5)
# what the official code effectively does (it inverts p): kept for reference / opt-in
OFFICIAL_CODE_BLUR_PROBS = (0.0, 0.9, 0.5)


def make_normalize_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Transform:
    return v2.Normalize(mean=list(mean), std=list(std))


def gaussian_blur(p: float, radius_min: float = 0.1, radius_max: float = 2.0) -> v2.Transform:
    """Blur with probability ``p`` (NOT inverted, unlike the official code)."""
    return v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(radius_min, radius_max))], p=p)


class DataAugmentationDINO:
    """``aug(image) -> {"global_crops": [t1, t2], "global_crops_teacher": [t1, t2], "local_crops": [...], "offsets": ()}``.

    ``image``: a PIL image, an HxWxC uint8 numpy array or a CxHxW uint8 tensor.
    """

    def __init__(
        self,
        global_crops_scale: Sequence[float] = (0.32, 1.0),
        local_crops_scale: Sequence[float] = (0.05, 0.32),
        local_crops_number: int = 8,
        global_crops_size: int = 224,
        local_crops_size: int = 96,
        *,
        hflip_prob: float = 0.5,
        color_jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        color_jitter_prob: float = 0.8,
        grayscale_prob: float = 0.2,
        blur_probs: Sequence[float] = DOCUMENTED_BLUR_PROBS,
        solarize_prob: float = 0.2,
        solarize_threshold: float = 128,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(blur_probs) != 3:
            raise ValueError("blur_probs must be (global 1, global 2, locals)")
        self.global_crops_scale = tuple(global_crops_scale)
        self.local_crops_scale = tuple(local_crops_scale)
        self.local_crops_number = int(local_crops_number)
        self.global_crops_size = int(global_crops_size)
        self.local_crops_size = int(local_crops_size)
        self.blur_probs = tuple(float(p) for p in blur_probs)
        self.solarize_prob = float(solarize_prob)

        bicubic = v2.InterpolationMode.BICUBIC
        self.geometric_augmentation_global = v2.Compose([
            v2.RandomResizedCrop(self.global_crops_size, scale=self.global_crops_scale, interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(p=hflip_prob),
        ])
        self.geometric_augmentation_local = v2.Compose([
            v2.RandomResizedCrop(self.local_crops_size, scale=self.local_crops_scale, interpolation=bicubic, antialias=True),
            v2.RandomHorizontalFlip(p=hflip_prob),
        ])
        b, c, s, h = color_jitter
        color_jittering = v2.Compose([
            v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=color_jitter_prob),
            v2.RandomGrayscale(p=grayscale_prob),
        ])
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), make_normalize_transform(mean, std)])

        self.global_transfo1 = v2.Compose([color_jittering, gaussian_blur(self.blur_probs[0]), self.normalize])
        self.global_transfo2 = v2.Compose([
            color_jittering,
            gaussian_blur(self.blur_probs[1]),
            v2.RandomSolarize(threshold=solarize_threshold, p=self.solarize_prob),
            self.normalize,
        ])
        self.local_transfo = v2.Compose([color_jittering, gaussian_blur(self.blur_probs[2]), self.normalize])
        self._to_image = v2.ToImage()

    def __call__(self, image: Any) -> dict[str, Any]:
        img = self._to_image(image)  # uint8 CxHxW tv_tensors.Image
        if img.dtype != torch.uint8:
            raise TypeError(f"expected a uint8 image, got {img.dtype}")
        if img.shape[0] == 1:
            img = tv_tensors.wrap(img.expand(3, -1, -1), like=img)
        elif img.shape[0] == 4:
            img = tv_tensors.wrap(img[:3], like=img)
        g1 = self.global_transfo1(self.geometric_augmentation_global(img))
        g2 = self.global_transfo2(self.geometric_augmentation_global(img))
        locals_ = [self.local_transfo(self.geometric_augmentation_local(img)) for _ in range(self.local_crops_number)]
        g1, g2 = g1.as_subclass(torch.Tensor), g2.as_subclass(torch.Tensor)
        return {
            "global_crops": [g1, g2],
            "global_crops_teacher": [g1, g2],
            "local_crops": [t.as_subclass(torch.Tensor) for t in locals_],
            "offsets": (),
        }

    def __repr__(self) -> str:
        return (
            f"DataAugmentationDINO(global={self.global_crops_size}@{self.global_crops_scale}, "
            f"local={self.local_crops_number}x{self.local_crops_size}@{self.local_crops_scale}, blur={self.blur_probs}, "
            f"solarize(global 2)={self.solarize_prob})"
        )
