"""One evaluation run on ImageFolders: result structure, pooling, JSON output, errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from model.eval.linear import ProbeConfig
from model.eval.run import evaluate, evaluate_features, write_results
from model.layers.vit import vit_test

SIZE = 28
PROBE = ProbeConfig(lrs=(0.01, 0.1), weight_decays=(0.0,), epochs=10, min_steps=60)


def make_digits_folder(root: Path, classes: range, per_class: int, start: int = 0, px: int = 32) -> Path:
    """``root/<digit>/<i>.png``: scikit-learn digits upscaled to ``px`` pixels, RGB."""
    digits = load_digits()
    for c in classes:
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in np.nonzero(digits.target == c)[0][start : start + per_class]:
            a = (digits.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(a).resize((px, px), Image.BILINEAR).convert("RGB").save(root / str(c) / f"{i:04d}.png")
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("digits")
    return make_digits_folder(root / "train", range(5), 12), make_digits_folder(root / "val", range(5), 4, start=12)


@pytest.fixture(scope="module")
def backbone() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_test(img_size=SIZE, init_values=None)


def test_evaluate_reports_every_method(folders: tuple[Path, Path], backbone: torch.nn.Module) -> None:
    train, val = folders
    res = evaluate(backbone, train, val, crop_size=SIZE, batch_size=16, probe=PROBE)
    json.dumps(res)  # JSON-able
    assert (res["n_train"], res["n_val"], res["n_classes"]) == (60, 20, 5)
    assert res["classes"] == ["0", "1", "2", "3", "4"]
    assert res["feature_dim"] == 64 and res["crop_size"] == SIZE and res["resize"] == 32
    knn = res["knn"]
    assert knn["temperature"] == 0.07 and set(knn["k"]) == {"10", "20"}
    for k, acc in knn["k"].items():
        assert set(acc) == {"top1", "top5", "k_used"} and acc["k_used"] == int(k)
        assert 0.0 <= acc["top1"] <= acc["top5"] <= 1.0
    lin = res["linear"]
    assert lin["feature_dim"] == 64 and lin["pooling"] == "cls"
    assert 0.0 <= lin["top1"] <= lin["top5"] <= 1.0 and lin["lr"] in PROBE.lrs
    assert res["seconds"]["total"] >= res["seconds"]["features"] >= 0


def test_cls_avgpool_probe_keeps_cls_knn(folders: tuple[Path, Path], backbone: torch.nn.Module) -> None:
    train, val = folders
    cls = evaluate(backbone, train, val, methods=("knn",), crop_size=SIZE)
    both = evaluate(backbone, train, val, crop_size=SIZE, linear_pooling="cls+avgpool", probe=PROBE)
    assert "linear" not in cls
    assert both["linear"]["feature_dim"] == 128 and both["linear"]["pooling"] == "cls+avgpool"
    assert both["knn"]["feature_dim"] == 64
    assert both["knn"]["k"] == cls["knn"]["k"]  # the kNN reads the same CLS features


def test_evaluate_features_on_separable_features() -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3) * 5
    ytr, yva = torch.arange(3).repeat(15), torch.arange(3).repeat(5)
    xtr = centres[ytr] + 0.3 * torch.randn(45, 3, generator=g)
    xva = centres[yva] + 0.3 * torch.randn(15, 3, generator=g)
    res = evaluate_features((xtr, ytr), (xva, yva), 3, ks=(1, 10), probe=PROBE)
    assert res["knn"]["k"] == {"1": {"top1": 1.0, "k_used": 1}, "10": {"top1": 1.0, "k_used": 10}}
    assert res["linear"]["top1"] == 1.0


def test_write_results_is_atomic_json(tmp_path: Path) -> None:
    out = tmp_path / "eval" / "results.json"
    write_results(out, {"knn": {"k": {"10": {"top1": 0.5}}}})
    write_results(out, {"knn": {"k": {"20": {"top1": 0.75}}}})  # replaces
    assert json.loads(out.read_text()) == {"knn": {"k": {"20": {"top1": 0.75}}}}
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary files left
    with pytest.raises(TypeError):
        write_results(out, {"bad": object()})
    assert json.loads(out.read_text()) == {"knn": {"k": {"20": {"top1": 0.75}}}}  # old file intact


def test_errors(tmp_path: Path, folders: tuple[Path, Path], backbone: torch.nn.Module) -> None:
    train, _ = folders
    with pytest.raises(ValueError, match="unknown eval methods"):
        evaluate(backbone, train, train, methods=("svm",), crop_size=SIZE)
    extra = make_digits_folder(tmp_path / "val", range(4, 7), 2)  # classes 5 and 6 are not in train
    with pytest.raises(ValueError, match=r"not among the training classes: \['5', '6'\]"):
        evaluate(backbone, train, extra, crop_size=SIZE)
    with pytest.raises(FileNotFoundError):
        evaluate(backbone, tmp_path / "nope", train, crop_size=SIZE)
