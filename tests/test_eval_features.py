"""Frozen features of labelled image folders: transform, manual-forward equality, labels, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from model.data.augmentations import IMAGENET_MEAN, IMAGENET_STD
from model.data.datasets import load_rgb
from model.eval.features import LabelledFolder, default_resize, extract_features, make_eval_transform, pool_features
from model.layers.vit import vit_test

SIZE = 28


def make_digits_folder(root: Path, classes: range | list[int], per_class: int, start: int = 0, px: int = 36) -> Path:
    """``root/<digit>/<i>.png``: scikit-learn digits upscaled to ``px`` pixels, RGB."""
    digits = load_digits()
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.nonzero(digits.target == c)[0][start : start + per_class]:
            a = (digits.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(a).resize((px, px), Image.BILINEAR).convert("RGB").save(root / str(c) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    model = vit_test(img_size=SIZE, init_values=None, drop_path_rate=0.5)  # train-mode drop path would show
    return model


def test_default_resize_keeps_the_256_224_ratio():
    assert default_resize(224) == 256
    assert default_resize(28) == 32
    assert default_resize(448) == 512


def test_eval_transform_resizes_crops_and_normalises():
    im = Image.new("RGB", (60, 40), (128, 64, 255))
    t = make_eval_transform(28)
    x = t(im)
    assert x.shape == (3, 28, 28) and x.dtype == torch.float32
    expected = (torch.tensor([128, 64, 255]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 14, 14], expected, atol=1e-3, rtol=0)
    # the shorter side goes to `resize`, then the centre crop
    big = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3))
    assert make_eval_transform(28, resize=40)(big).shape == (3, 28, 28)
    with pytest.raises(ValueError):
        make_eval_transform(28, resize=20)


def test_features_equal_a_manual_forward(tmp_path: Path, backbone: torch.nn.Module):
    root = make_digits_folder(tmp_path / "train", [3, 5, 7], 4)
    backbone.train()
    feats, labels, classes = extract_features(backbone, root, crop_size=SIZE, batch_size=5)
    assert backbone.training  # mode restored
    assert classes == ["3", "5", "7"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert feats.shape == (12, 64) and feats.dtype == torch.float32

    paths = sorted(root.rglob("*.png"))
    t = make_eval_transform(SIZE)
    x = torch.stack([t(load_rgb(p)) for p in paths])
    backbone.eval()
    with torch.no_grad():
        out = backbone.forward_features(x)
    backbone.train()
    torch.testing.assert_close(feats, out["x_norm_clstoken"], atol=1e-5, rtol=1e-5)

    both, _, _ = extract_features(backbone, root, crop_size=SIZE, pooling="cls+avgpool")
    manual = torch.cat([out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(1)], dim=1)
    torch.testing.assert_close(both, manual, atol=1e-5, rtol=1e-5)
    assert both.shape == (12, 128)


def test_bf16_autocast_is_close(tmp_path: Path, backbone: torch.nn.Module):
    root = make_digits_folder(tmp_path / "d", [0, 1], 3)
    f32, _, _ = extract_features(backbone, root, crop_size=SIZE)
    bf16, _, _ = extract_features(backbone, root, crop_size=SIZE, bf16=True)
    assert bf16.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(f32, bf16, dim=1)
    assert cos.min() > 0.98


def test_val_labels_follow_train_classes(tmp_path: Path, backbone: torch.nn.Module):
    make_digits_folder(tmp_path / "val", [5, 7], 2)
    _, labels, classes = extract_features(backbone, tmp_path / "val", crop_size=SIZE, classes=["3", "5", "7"])
    assert classes == ["3", "5", "7"] and labels.tolist() == [1, 1, 2, 2]
    with pytest.raises(ValueError, match="not among the training classes"):
        extract_features(backbone, tmp_path / "val", crop_size=SIZE, classes=["3", "5"])


def test_dataset_input_matches_folder(tmp_path: Path, backbone: torch.nn.Module):
    root = make_digits_folder(tmp_path / "d", [1, 2], 3)
    paths = sorted(root.rglob("*.png"))

    class Pairs(torch.utils.data.Dataset):
        classes = ["1", "2"]

        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int):
            return load_rgb(paths[i]), int(paths[i].parent.name == "2")

    a, la, ca = extract_features(backbone, root, crop_size=SIZE)
    b, lb, cb = extract_features(backbone, Pairs(), crop_size=SIZE, batch_size=4)
    torch.testing.assert_close(a, b)
    assert torch.equal(la, lb) and ca == cb


def test_pool_features_rejects_unknown():
    out = {"x_norm_clstoken": torch.ones(1, 2), "x_norm_patchtokens": torch.ones(1, 3, 2)}
    with pytest.raises(ValueError):
        pool_features(out, "gem")


def test_folder_errors(tmp_path: Path, backbone: torch.nn.Module):
    with pytest.raises(FileNotFoundError):
        LabelledFolder(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(ValueError, match="no image files"):
        extract_features(backbone, tmp_path / "empty", crop_size=SIZE)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (30, 30)).save(flat / "a.png")
    with pytest.raises(ValueError, match="no class folders"):
        LabelledFolder(flat)
    make_digits_folder(flat, [1], 2)
    with pytest.raises(ValueError, match="directly under"):
        LabelledFolder(flat)
    make_digits_folder(tmp_path / "ok", [1], 2)
    with pytest.raises(ValueError, match="multiple of the backbone's patch size"):
        extract_features(backbone, tmp_path / "ok", crop_size=30)
