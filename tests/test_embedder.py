"""Embedder: open_clip / dinov2 / timm models, offline, CPU; exact agreement with the libraries' own loading."""
from __future__ import annotations

import hashlib
import io
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from photos import jpeg, photo
from pipeline.embedding.embedder import (
    Embedder,
    decode_image,
    embedding_dim,
    extract_backbone_state_dict,
    infer_dinov2_arch,
)
from pipeline.embedding.weights import WeightsUnavailable, hf_hub_cache_dir

NAMES = ("astronaut", "coffee", "chelsea")


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network (any connection fails the test), HF offline, empty private caches, one CPU thread."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models; avoids thread contention on busy test machines
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    return [jpeg(photo(n)) for n in NAMES]


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Non-trivial values everywhere (LayerScale gammas too), so a wrong load shows in the features."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if ("norm" in name and name.endswith("weight")) or name.endswith("gamma")
                    else 0.05 * noise)
    return model.state_dict()


def write_hf_cache_file(repo_id: str, filename: str, data: bytes, revision: str = "b" * 40) -> Path:
    """huggingface_hub's cache layout: blobs/<sha256>, snapshots/<rev>/<file> → blob, refs/main."""
    repo = Path(hf_hub_cache_dir()) / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    snap = repo / "snapshots" / revision / filename
    snap.parent.mkdir(parents=True, exist_ok=True)
    snap.symlink_to(os.path.relpath(blob, snap.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snap


def library_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point huggingface_hub's import-time constants at this test's cache, offline (for the libraries' own loaders)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", hf_hub_cache_dir())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def assert_unit_fp16(out: np.ndarray, n: int, dim: int) -> None:
    assert out.shape == (n, dim) and out.dtype == np.float16
    np.testing.assert_allclose(np.linalg.norm(out.astype(np.float32), axis=1), 1.0, atol=1e-2)


# ------------------------------------------------------------------------------------- open_clip


def test_open_clip_random_init_is_deterministic(images: list[bytes]) -> None:
    rng = torch.random.get_rng_state()
    a = Embedder("open_clip:ViT-S-32:none")
    assert torch.equal(torch.random.get_rng_state(), rng), "global RNG state must be restored"
    b = Embedder("open_clip:ViT-S-32:none", device="cpu", precision="fp32")
    assert a.dim == b.dim == 384
    assert a.model_id == "open_clip:ViT-S-32:none@random-init:0"
    assert a.weights_source == "random init (pretrained: none)"
    ea, eb = a.embed(images), b.embed(images)
    assert_unit_fp16(ea, 3, 384)
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea[0], ea[1], atol=1e-3)  # different images, different vectors
    assert (a.device.type, a.precision) == ("cpu", "fp32")


def test_fake_open_clip_cache_loads_those_exact_weights(images: list[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A ViT-B-32 `laion2b_s34b_b79k` file put in the HF cache layout: found offline, loaded by the Embedder,
    giving the same weights and embeddings as open_clip's own loading of that tag."""
    import open_clip
    from open_clip.pretrained import HF_SAFE_WEIGHTS_NAME, get_pretrained_cfg
    from safetensors.torch import save

    arch, tag = "ViT-B-32", "laion2b_s34b_b79k"
    cfg = get_pretrained_cfg(arch, tag)
    repo_id, filename = os.path.split(cfg["hf_hub"])
    assert filename == ""  # → open_clip_pytorch_model.bin, with open_clip_model.safetensors tried first
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)  # not the Embedder's random-init seed
        source = open_clip.create_model(arch, pretrained=None)
    state = {k: v.half().contiguous() for k, v in source.state_dict().items()}  # half: a smaller test file
    del source
    path = write_hf_cache_file(repo_id, HF_SAFE_WEIGHTS_NAME, save(state))

    emb = Embedder(f"open_clip:{arch}:{tag}")
    assert emb.weights_source == f"open_clip cache {path}"
    assert emb.model_id == f"open_clip:{arch}:{tag}@sha256:{hashlib.sha256(path.read_bytes()).hexdigest()[:16]}"
    loaded = emb.model.state_dict()
    for k, v in loaded.items():  # the visual tower holds exactly the file's weights
        assert torch.equal(v, state[f"visual.{k}"].float()), k
    ours = emb.embed(images)

    library_offline(monkeypatch)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=tag)  # open_clip's own way
    model.eval()
    x = torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images])
    with torch.no_grad():
        theirs = F.normalize(model.encode_image(x).float(), dim=-1).half().numpy()
    assert_unit_fp16(ours, 3, 512)
    np.testing.assert_allclose(ours.astype(np.float32), theirs.astype(np.float32), atol=2e-3)


def test_weights_are_checked_before_building_anything(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import open_clip

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("model built before the weights check")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", forbidden)
    with pytest.raises(WeightsUnavailable, match="lvd models fetch"):
        Embedder("open_clip:ViT-H-14:laion2b_s32b_b79k")
    with pytest.raises(WeightsUnavailable, match=str(tmp_path / "missing.pth")):
        Embedder(f"dinov2:{tmp_path / 'missing.pth'}")
    with pytest.raises(WeightsUnavailable):
        Embedder("timm:vit_tiny_patch16_224")


# ------------------------------------------------------------------------------------- dinov2


def dinov2_reference(backbone: torch.nn.Module, data: list[bytes]) -> np.ndarray:
    """The backbone's forward on the documented preprocessing, built independently of the Embedder."""
    from torchvision import transforms

    t = transforms.Compose([
        transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224),
        transforms.ToTensor(),
        transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    ])
    x = torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in data])
    with torch.no_grad():
        return F.normalize(backbone.eval()(x).float(), dim=-1).half().numpy()


def test_dinov2_checkpoint_equals_backbone_forward(images: list[bytes], tmp_path: Path) -> None:
    from model.layers.vit import vit_test

    backbone = vit_test()
    sd = _randomize(backbone, seed=7)
    path = tmp_path / "vit_test.pth"
    torch.save(sd, path)
    for spec in (f"dinov2:{path}", f"dinov2:vit_test:{path}"):
        emb = Embedder(spec)
        assert emb.dim == 64
        assert emb.weights_source == f"checkpoint {path}"
        assert emb.model_id.endswith("@sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16])
        out = emb.embed(images)
        assert_unit_fp16(out, 3, 64)
        np.testing.assert_allclose(out.astype(np.float32), dinov2_reference(backbone, images).astype(np.float32),
                                   atol=1e-3)
    random_init = Embedder("dinov2:vit_test:none")
    assert random_init.model_id == "dinov2:vit_test:none@random-init:0"
    np.testing.assert_array_equal(random_init.embed(images), Embedder("dinov2:vit_test:none").embed(images))
    with pytest.raises(ValueError, match="that is vit_test.*spec says vit_small"):
        Embedder(f"dinov2:vit_small:{path}")
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Embedder(f"dinov2:{path}", image_size=200)
    assert Embedder(f"dinov2:{path}", image_size=112).embed(images[:1]).shape == (1, 64)


def test_dinov2_training_checkpoint_layouts(images: list[bytes], tmp_path: Path) -> None:
    """Registers + SwiGLU + 518 grid, wrapped like training checkpoints: the teacher backbone is loaded."""
    from model.layers.vit import vit_test

    kw = dict(num_register_tokens=4, ffn_layer="swiglufused", img_size=518)
    teacher, student = vit_test(**kw), vit_test(**kw)
    t_sd, s_sd = _randomize(teacher, seed=1), _randomize(student, seed=2)
    official_train = {"model": {**{f"student.backbone.{k}": v for k, v in s_sd.items()},
                                **{f"teacher.backbone.{k}": v for k, v in t_sd.items()},
                                "teacher.dino_head.last_layer.weight": torch.zeros(3, 3)},
                      "iteration": torch.tensor(5)}
    teacher_ckpt = {"teacher": {**{f"backbone.{k}": v for k, v in t_sd.items()}, "dino_head.mlp.0.weight": torch.zeros(2)}}
    chunked = {"state_dict": {f"module.{k.replace('blocks.', 'blocks.0.')}": v for k, v in t_sd.items()}}
    expected = dinov2_reference(teacher, images[:2])
    for i, ckpt in enumerate((official_train, teacher_ckpt, chunked)):
        assert set(extract_backbone_state_dict(ckpt)) == set(t_sd)
        path = tmp_path / f"ckpt{i}.pth"
        torch.save(ckpt, path)
        emb = Embedder(f"dinov2:{path}")
        np.testing.assert_allclose(emb.embed(images[:2]).astype(np.float32), expected.astype(np.float32), atol=1e-3)


@pytest.mark.parametrize("arch", ["vit_test", "vit_tiny", "vit_small", "vit_base", "vit_large", "vit_giant2"])
@pytest.mark.parametrize("registers", [0, 4])
def test_dinov2_arch_inference_from_shapes(arch: str, registers: int) -> None:
    """Official hub-style checkpoints (518 grid, with/without registers, SwiGLU for giant) → the right arch."""
    from model.layers.vit import build_backbone

    with torch.device("meta"):
        sd = build_backbone(arch, img_size=518, num_register_tokens=registers).state_dict()
        found, kwargs = infer_dinov2_arch(sd)
        rebuilt = build_backbone(found, **kwargs).state_dict()
    assert found == arch
    assert kwargs["num_register_tokens"] == registers and kwargs["img_size"] == 518
    assert (kwargs["ffn_layer"] == "swiglufused") == (arch == "vit_giant2")
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in sd.items()}


def test_dinov2_arch_inference_picks_size_end_to_end(images: list[bytes], tmp_path: Path) -> None:
    from model.layers.vit import vit_tiny

    backbone = vit_tiny(init_values=None)  # no LayerScale: inferred from the missing gammas
    sd = _randomize(backbone, seed=3)
    path = tmp_path / "tiny.pth"
    torch.save(sd, path)
    emb = Embedder(f"dinov2:{path}")
    assert emb.dim == 192
    np.testing.assert_allclose(emb.embed(images[:1]).astype(np.float32),
                               dinov2_reference(backbone, images[:1]).astype(np.float32), atol=1e-3)


# ------------------------------------------------------------------------------------- timm


def test_timm_random_init(images: list[bytes]) -> None:
    a, b = Embedder("timm:vit_tiny_patch16_224:none"), Embedder("timm:vit_tiny_patch16_224:none")
    assert a.dim == 192 and a.model_id == "timm:vit_tiny_patch16_224:none@random-init:0"
    out = a.embed(images)
    assert_unit_fp16(out, 3, 192)
    np.testing.assert_array_equal(out, b.embed(images))


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "mobilenetv3_small_050", "resnet18"])
def test_timm_embedding_dim_equals_the_embedders_output(arch: str, images: list[bytes]) -> None:
    """Read from the config on the meta device (no weights), and equal to what the model emits — incl.
    MobileNetV3, whose pooled output is its head's hidden layer (1024), not ``num_features`` (288)."""
    out = Embedder(f"timm:{arch}:none").embed(images[:1])
    assert embedding_dim(f"timm:{arch}:none") == out.shape[1]


def test_timm_checkpoint_and_fake_hub_cache_match_timm(images: list[bytes], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import timm
    from safetensors.torch import save
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    from timm.models._hub import hf_split

    name = "vit_tiny_patch16_224"
    reference = timm.create_model(name, pretrained=False)  # with its 1000-class head, like a real checkpoint
    sd = {k: v.contiguous() for k, v in _randomize(reference, seed=5).items()}
    reference.reset_classifier(0)
    reference.eval()
    t = create_transform(**resolve_data_config({}, model=reference), is_training=False)
    x = torch.stack([t(Image.open(io.BytesIO(b)).convert("RGB")) for b in images])
    with torch.no_grad():
        expected = F.normalize(reference(x), dim=-1).half().numpy()

    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": sd, "epoch": 3}, ckpt)  # a timm training checkpoint
    headless = tmp_path / "headless.safetensors"
    headless.write_bytes(save({k: v for k, v in sd.items() if not k.startswith("head.")}))
    repo_id, _ = hf_split(get_pretrained_cfg(name).hf_hub_id)
    cached = write_hf_cache_file(repo_id, "model.safetensors", save(sd))
    for spec, source in ((f"timm:{name}:{ckpt}", f"checkpoint {ckpt}"),
                         (f"timm:{name}:{headless}", f"checkpoint {headless}"),
                         (f"timm:{name}", f"timm cache {cached}")):
        emb = Embedder(spec)
        assert emb.weights_source == source and emb.dim == 192
        np.testing.assert_allclose(emb.embed(images).astype(np.float32), expected.astype(np.float32), atol=2e-3)

    library_offline(monkeypatch)
    theirs = timm.create_model(name, pretrained=True, num_classes=0).eval()  # timm's own hub load, offline
    with torch.no_grad():
        np.testing.assert_allclose(F.normalize(theirs(x), dim=-1).half().numpy().astype(np.float32),
                                   expected.astype(np.float32), atol=2e-3)

    wrong = tmp_path / "wrong.pth"
    torch.save({k: v for k, v in sd.items() if "blocks.0." not in k}, wrong)
    with pytest.raises(RuntimeError, match="Missing key"):  # strict: never a partly random model
        Embedder(f"timm:{name}:{wrong}")


# ------------------------------------------------------------------------------------- inputs


def test_bad_bytes_give_nan_rows(images: list[bytes]) -> None:
    emb = Embedder("dinov2:vit_test:none")
    gray_png = io.BytesIO()
    photo("camera").convert("L").save(gray_png, "PNG")
    batch = [images[0], b"not an image", b"", images[1][:200], gray_png.getvalue()]
    out = emb.embed(batch)
    assert out.shape == (5, 64) and out.dtype == np.float16
    assert np.isnan(out[1:4]).all()
    assert not np.isnan(out[[0, 4]]).any()
    np.testing.assert_array_equal(out[0], emb.embed(images[:1])[0])  # batch composition does not matter
    assert np.isnan(emb.embed([b"x", b"y"])).all()
    assert emb.embed([]).shape == (0, 64)
    assert decode_image(b"junk") is None and decode_image(images[0]).mode == "RGB"


def test_precision_and_device_options(images: list[bytes]) -> None:
    emb = Embedder("dinov2:vit_test:none", device="cpu", precision="bf16")
    assert emb.precision == "bf16"
    out = emb.embed(images)
    assert_unit_fp16(out, 3, 64)
    ref = Embedder("dinov2:vit_test:none").embed(images)
    assert np.abs(out.astype(np.float32) - ref.astype(np.float32)).max() < 0.1
    with pytest.raises(ValueError, match="precision"):
        Embedder("dinov2:vit_test:none", precision="int8")
