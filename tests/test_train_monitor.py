"""model.train.monitor: class-stratified subsets, labelled splits, joint feature extraction, the online kNN."""
from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from distributed import run_distributed
from model.eval.features import make_eval_transform
from model.layers.vit import build_backbone
from model.train.job import KnnMonitor
from model.train.monitor import OnlineKnn, _subset, distributed_features, load_split

CROP = 28
SHADES = {"blue": [(0, 0, 255), (20, 30, 220), (40, 10, 190)],
          "green": [(0, 255, 0), (30, 220, 20), (10, 190, 40)],
          "red": [(255, 0, 0), (220, 20, 30), (190, 40, 10)]}


def no_autocast() -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def tiny_backbone(seed: int = 0):
    """A 2-block ViT, patch 7, no LayerScale (with a 1e-5 LayerScale every CLS feature would be the same)."""
    torch.manual_seed(seed)
    return build_backbone("vit_test", patch_size=7, img_size=CROP, init_values=None).eval()


def colour_folder(root: Path, shades: dict[str, list[tuple[int, int, int]]]) -> Path:
    for cls, colours in shades.items():
        (root / cls).mkdir(parents=True)
        for i, rgb in enumerate(colours):
            Image.new("RGB", (32, 32), rgb).save(root / cls / f"{i}.png")
    return root


# ------------------------------------------------------------------ subsets and splits
def test_subset_round_robin_keeps_every_class() -> None:
    targets = [0, 0, 0, 0, 1, 1, 2]
    assert _subset(targets, 3) == [0, 4, 6]  # one of each class first
    assert _subset(targets, 5) == [0, 1, 4, 5, 6]
    assert _subset(targets, 6) == [0, 1, 2, 4, 5, 6]
    assert _subset(targets, 100) == list(range(7))
    assert _subset([2, 0, 2, 1, 0], 3) == [0, 1, 3]  # indices stay in dataset order
    assert _subset([], 5) == [] and _subset(targets, 0) == []


def test_load_split(tmp_path: Path) -> None:
    folder = colour_folder(tmp_path / "train", SHADES)
    images, labels, classes = load_split(str(folder), make_eval_transform(CROP), limit=4)
    assert classes == ["blue", "green", "red"]
    assert images.shape == (4, 3, CROP, CROP) and images.dtype == torch.float32
    assert labels.tolist() == [0, 0, 1, 2]  # blue/0.png, blue/1.png, green/0.png, red/0.png
    assert images[2, 1].mean() > images[2, 0].mean()  # the green image is green


def test_load_split_needs_class_folders(tmp_path: Path) -> None:
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "flat.png")
    with pytest.raises(ValueError, match="no class sub-folders"):
        load_split(str(tmp_path), make_eval_transform(CROP), limit=10)


# ------------------------------------------------------------------ features
def test_distributed_features_one_process_equals_plain_forward() -> None:
    backbone = tiny_backbone()
    images = torch.randn(5, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = backbone.forward_features(images)["x_norm_clstoken"]
    got = distributed_features(backbone, images, batch_size=2, autocast=no_autocast)
    assert got.shape == (5, 64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def _features_on_ranks(rank: int, world_size: int) -> dict:
    from model.train.fsdp import device_mesh, mixed_precision_policy, shard_module

    backbone = tiny_backbone()
    images = torch.randn(5, 3, CROP, CROP, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = backbone.forward_features(images)["x_norm_clstoken"]
    shard_module(backbone, device_mesh(world_size, "cpu"), mixed_precision_policy("fp32", "cpu"))
    # 5 images on 2 ranks, batches of 2: rank 0 runs 2+1 images, rank 1 runs 2 + an empty (padded) pass
    got = distributed_features(backbone, images, batch_size=2, autocast=no_autocast)
    return {"want": want, "got": got}


def test_distributed_features_two_sharded_ranks(tmp_path: Path) -> None:
    for r in run_distributed(_features_on_ranks, tmp_path):
        assert r["got"].shape == (5, 64)
        torch.testing.assert_close(r["got"], r["want"], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ OnlineKnn
def knn_settings(tmp_path: Path, **kw) -> KnnMonitor:
    train = colour_folder(tmp_path / "train", SHADES)
    val = colour_folder(tmp_path / "val", {c: v[::-1][:2] for c, v in SHADES.items()})
    return KnnMonitor(train_dir=str(train), val_dir=str(val), **{"k": 3, "crop_size": CROP, **kw})


def test_online_knn_due(tmp_path: Path) -> None:
    settings = knn_settings(tmp_path, every=5)
    knn = OnlineKnn(settings, make_eval_transform(CROP))
    assert [s for s in range(13) if knn.due(s, last_step=12)] == [4, 9, 12]  # every 5th step and the last
    assert [s for s in range(10) if knn.due(s, last_step=9)] == [4, 9]
    off = OnlineKnn(replace(settings, every=0), make_eval_transform(CROP))
    assert not any(off.due(s, last_step=9) for s in range(10))  # 0 = off, even at the last step


def test_online_knn_measures_separable_colours(tmp_path: Path) -> None:
    knn = OnlineKnn(knn_settings(tmp_path, every=1, max_images=6), make_eval_transform(CROP), batch_size=4)
    assert knn.num_classes == 3
    assert knn.train_labels.tolist() == [0, 0, 1, 1, 2, 2] and knn.val_labels.tolist() == [0, 0, 1, 1, 2, 2]
    backbone = tiny_backbone().train()
    assert knn.measure(backbone, no_autocast) == 1.0
    assert backbone.training  # measure() restores the mode it found

    # the vote really uses the labels: with the train labels rotated no prediction is right
    knn.train_labels = (knn.train_labels + 1) % 3
    assert knn.measure(backbone, no_autocast) == 0.0


def test_online_knn_rejects_different_classes(tmp_path: Path) -> None:
    train = colour_folder(tmp_path / "train", SHADES)
    val = colour_folder(tmp_path / "val", {"blue": SHADES["blue"], "red": SHADES["red"]})
    with pytest.raises(ValueError, match="classes"):
        OnlineKnn(KnnMonitor(train_dir=str(train), val_dir=str(val), every=1), make_eval_transform(CROP))
