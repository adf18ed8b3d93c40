"""A tiny DINOv2 setting on real photos, shared by the local-training and distillation tests.

Data: 16 photos shipped inside scikit-image and scikit-learn (downsized to 128 px short side).
Model: 2-block ViT (dim 64, 2 heads, patch 14), global crops 56 px, 4 local crops of 28 px,
256 prototypes, batch 16 (see tests/test_local_train.py for why these tiny-regime settings).
Evaluation: kNN (k=10, T=0.07) on CLS features of random crops labelled by source photo.
``trained_tiny_teacher`` (a session fixture in conftest) trains it once for every test that needs it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import skimage
import sklearn.datasets
import torch
from PIL import Image
from torchvision.transforms import v2

from model.data.augmentations import make_normalize_transform
from model.eval.knn import extract_features, knn_accuracy
from model.ssl.config import SSLConfig
from model.ssl.meta_arch import SSLMetaArch
from model.train.local import LocalTrainResult, train_local

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
SKLEARN_IMAGES = Path(sklearn.datasets.__file__).parent / "images"
PHOTOS = [SKIMAGE_DATA / n for n in (
    "astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png",
    "retina.jpg", "rocket.jpg", "camera.png", "brick.png", "grass.png", "gravel.png", "moon.png", "coins.png",
)] + [SKLEARN_IMAGES / "china.jpg", SKLEARN_IMAGES / "flower.jpg"]

STEPS, GLOBAL, LOCAL, K = 300, 56, 28, 256


def tiny_config(seed: int = 0) -> SSLConfig:
    return SSLConfig().with_updates(
        student={"arch": "vit_test", "patch_size": 14, "drop_path_rate": 0.0, "layerscale": None,
                 "backbone_kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 2}},
        crops={"global_crops_size": GLOBAL, "local_crops_size": LOCAL, "local_crops_number": 4},
        dino={"head_n_prototypes": K, "head_hidden_dim": 256, "head_bottleneck_dim": 64},
        ibot={"head_n_prototypes": K},
        train={"batch_size_per_gpu": 16, "official_epoch_length": 10, "seed": seed, "centering": "sinkhorn_knopp"},
        optim={"epochs": STEPS // 10, "warmup_epochs": 3, "lr": 1e-3, "min_lr": 1e-4, "weight_decay_end": 0.1},
        teacher={"momentum_teacher": 0.99, "warmup_teacher_temp": 0.02, "teacher_temp": 0.02,
                 "warmup_teacher_temp_epochs": 10},
        compute={"autocast_dtype": "fp32"},
    )


def write_photos(folder: Path) -> tuple[Path, list[Image.Image]]:
    """The photos at 128 px short side, as PNG files in ``folder`` (and in memory)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for p in PHOTOS:
        im = Image.open(p).convert("RGB")
        s = 128 / min(im.size)
        im = im.resize((round(im.width * s), round(im.height * s)), Image.BICUBIC)
        im.save(folder / f"{p.stem}.png")
        images.append(im)
    return folder, images


def crop_eval_set(images: list[Image.Image], per_class: int = 20, seed: int = 1234):
    torch.manual_seed(seed)
    crop = v2.Compose([
        v2.ToImage(),
        v2.RandomResizedCrop(GLOBAL, scale=(0.1, 0.5), antialias=True),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.ToDtype(torch.float32, scale=True),
        make_normalize_transform(),
    ])
    x = torch.stack([crop(im) for im in images for _ in range(per_class)])
    y = torch.arange(len(images)).repeat_interleave(per_class)
    labelled = torch.arange(len(y)) % 2 == 0
    return x, y, labelled


def teacher_knn(model: SSLMetaArch, x, y, labelled) -> float:
    f = extract_features(model.teacher["backbone"], x)
    return knn_accuracy(f[labelled], y[labelled], f[~labelled], y[~labelled], k=10, T=0.07)


def mean(xs) -> float:
    return sum(xs) / len(xs)


def backbone_knn(backbone: torch.nn.Module, x, y, labelled) -> float:
    f = extract_features(backbone, x)
    return knn_accuracy(f[labelled], y[labelled], f[~labelled], y[~labelled], k=10, T=0.07)


@dataclass
class TrainedTiny:
    cfg: SSLConfig
    folder: Path
    images: list
    eval_set: tuple
    acc_init: float
    acc_trained: float
    result: LocalTrainResult


def train_tiny_teacher(folder: Path) -> TrainedTiny:
    """STEPS steps of the tiny setting with one intra-op thread; kNN before and after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: intra-op threading only adds overhead
    try:
        folder, images = write_photos(folder)
        cfg = tiny_config(seed=0)
        x, y, labelled = crop_eval_set(images)
        torch.manual_seed(cfg.train.seed)
        model = SSLMetaArch(cfg)
        acc_init = teacher_knn(model, x, y, labelled)
        result = train_local(cfg, folder, STEPS, seed=cfg.train.seed, model=model, log_every=0)
        acc_trained = teacher_knn(result.model, x, y, labelled)
    finally:
        torch.set_num_threads(n)
    return TrainedTiny(cfg, folder, images, (x, y, labelled), acc_init, acc_trained, result)
