"""Weights resolution: explicit checkpoints, random init, library caches (real HF layout), never the network."""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.embedding.weights import (
    RANDOM_INIT,
    WeightsUnavailable,
    check_weights,
    fetch_weights,
    hf_hub_cache_dir,
    resolve_weights,
    weights_digest,
)

ROOT = Path(__file__).resolve().parent.parent
VITH = "open_clip:ViT-H-14:laion2b_s32b_b79k"


class NetworkAttempts(list):
    """Every socket connection attempted during a test (each one also fails)."""


@pytest.fixture
def net(monkeypatch: pytest.MonkeyPatch) -> NetworkAttempts:
    """No network: connections raise AssertionError and are recorded."""
    attempts = NetworkAttempts()

    def refuse(*args: object, **kwargs: object) -> None:
        attempts.append(args)
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, net: NetworkAttempts) -> Path:
    """Offline, with empty HF and torch caches under tmp_path (the machine's real caches are not consulted)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TIMM_USE_OLD_CACHE"):
        monkeypatch.delenv(var, raising=False)
    yield tmp_path
    assert not net, f"network access attempted: {net}"


def write_hf_cache_file(repo_id: str, filename: str, data: bytes, revision: str = "a" * 40) -> Path:
    """Put ``data`` where huggingface_hub caches ``repo_id/filename``: blob + snapshot symlink + refs/main."""
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


def open_clip_hub_file(arch: str, tag: str) -> tuple[str, str]:
    """(repo id, default filename) of an open_clip tag, from open_clip's own pretrained table."""
    from open_clip.pretrained import HF_WEIGHTS_NAME, get_pretrained_cfg

    repo_id, filename = os.path.split(get_pretrained_cfg(arch, tag)["hf_hub"])
    return repo_id, filename or HF_WEIGHTS_NAME


@pytest.fixture
def vit_test_checkpoint(tmp_path: Path) -> Path:
    from model.layers.vit import vit_test

    path = tmp_path / "ckpt" / "vit_test.pth"
    path.parent.mkdir()
    torch.save(vit_test().state_dict(), path)
    return path


# ------------------------------------------------------------------------------- unavailable


def test_open_clip_tag_not_cached_offline(isolated_caches: Path) -> None:
    with pytest.raises(WeightsUnavailable) as err:
        check_weights(VITH)
    message = str(err.value)
    cache = hf_hub_cache_dir()
    assert cache == str(isolated_caches / "hf" / "hub")
    assert cache in message
    assert f"{cache}/models--laion--CLIP-ViT-H-14-laion2B-s32B-b79K" in message
    assert "open_clip_pytorch_model.bin" in message and "open_clip_model.safetensors" in message
    assert f"lvd models fetch '{VITH}'" in message
    assert "HF_HUB_OFFLINE" in message
    assert "open_clip:ViT-H-14:/path/to/" in message  # the explicit-path alternative
    assert isinstance(err.value, RuntimeError)


def test_timm_pretrained_not_cached_offline() -> None:
    with pytest.raises(WeightsUnavailable) as err:
        check_weights("timm:vit_tiny_patch16_224")
    message = str(err.value)
    assert f"{hf_hub_cache_dir()}/models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k" in message
    assert "model.safetensors" in message and "pytorch_model.bin" in message
    assert "lvd models fetch 'timm:vit_tiny_patch16_224'" in message


def test_unknown_tags_and_archs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="laion2b_s34b_b79k") as err:
        check_weights("open_clip:ViT-B-32:laion9b_nope")
    assert not isinstance(err.value, WeightsUnavailable)
    assert "valid tags for ViT-B-32" in str(err.value)
    with pytest.raises(ValueError, match="ViT-B-32"):
        check_weights("open_clip:ViT-B-33:openai")
    with pytest.raises(ValueError, match="vit_tiny_patch16_224.augreg_in21k"):
        check_weights("timm:vit_tiny_patch16_224.nope")
    with pytest.raises(ValueError, match="vit_tiny_patch16_224"):
        check_weights("timm:vit_tinyy_patch16_224")


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "teacher.pth"
    for spec in (f"dinov2:{missing}", f"timm:resnet18:{missing}", f"open_clip:ViT-B-32:{missing}"):
        with pytest.raises(WeightsUnavailable, match=str(missing)):
            check_weights(spec)
    with pytest.raises(WeightsUnavailable, match="not a file"):
        check_weights(f"dinov2:vit_test:{tmp_path}/")


# ------------------------------------------------------------------------------- available


def test_explicit_checkpoint_and_random_init(vit_test_checkpoint: Path) -> None:
    assert check_weights(f"dinov2:{vit_test_checkpoint}") == f"checkpoint {vit_test_checkpoint}"
    assert check_weights(f"dinov2:vit_test:{vit_test_checkpoint}") == f"checkpoint {vit_test_checkpoint}"
    assert resolve_weights(f"dinov2:{vit_test_checkpoint}").path == str(vit_test_checkpoint)
    for spec in ("open_clip:ViT-H-14:none", "dinov2:vit_small:none", "timm:resnet18:none"):
        assert check_weights(spec) == RANDOM_INIT == "random init (pretrained: none)"
        assert resolve_weights(spec).path is None
    assert weights_digest(vit_test_checkpoint) == hashlib.sha256(vit_test_checkpoint.read_bytes()).hexdigest()


@pytest.mark.parametrize("stored", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors", "both"])
def test_fake_open_clip_cache_is_found_like_open_clip_does(stored: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file in the HF cache layout is found, offline, at the path open_clip itself resolves the tag to."""
    from huggingface_hub import constants, hf_hub_download
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    repo_id, default = open_clip_hub_file("ViT-B-32", "laion2b_s34b_b79k")
    assert (repo_id, default) == ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "open_clip_pytorch_model.bin")
    names = ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"] if stored == "both" else [stored]
    paths = {name: write_hf_cache_file(repo_id, name, f"weights {name}".encode()) for name in names}
    expected = paths.get("open_clip_model.safetensors") or paths[stored]  # safetensors first, as open_clip
    spec = "open_clip:ViT-B-32:laion2b_s34b_b79k"
    assert check_weights(spec) == f"open_clip cache {expected}"
    assert fetch_weights(spec) == str(expected)  # already cached: no download attempted
    # huggingface_hub's own offline lookup agrees ...
    assert hf_hub_download(repo_id, expected.name, cache_dir=hf_hub_cache_dir(), local_files_only=True) == str(expected)
    # ... and so does open_clip's own tag resolution (its import-time HF constants pointed at this cache)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hf_hub_cache_dir())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert download_pretrained(get_pretrained_cfg("ViT-B-32", "laion2b_s34b_b79k")) == str(expected)


def test_fake_timm_cache_is_found_like_timm_does(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg
    from timm.models._hub import hf_split

    repo_id, _ = hf_split(get_pretrained_cfg("resnet18").hf_hub_id)
    path = write_hf_cache_file(repo_id, "model.safetensors", b"not really weights")
    assert check_weights("timm:resnet18") == f"timm cache {path}"
    assert check_weights("timm:resnet18.a1_in1k") == f"timm cache {path}"
    with pytest.raises(WeightsUnavailable):
        check_weights("timm:resnet18.tv_in1k")  # another tag, another repo
    monkeypatch.setattr(constants, "HF_HUB_CACHE", hf_hub_cache_dir())
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    from huggingface_hub import hf_hub_download

    assert hf_hub_download(repo_id, "model.safetensors") == str(path)


def test_cache_dir_matches_huggingface_hub_in_a_fresh_process(tmp_path: Path) -> None:
    """hf_hub_cache_dir() follows huggingface_hub's env precedence (which it reads at import)."""
    code = ("from huggingface_hub import constants; from pipeline.embedding.weights import hf_hub_cache_dir; "
            "print(constants.HF_HUB_CACHE); print(hf_hub_cache_dir())")
    for extra in ({"HF_HOME": str(tmp_path / "a")}, {"HF_HUB_CACHE": str(tmp_path / "b")},
                  {"XDG_CACHE_HOME": str(tmp_path / "c")}, {"HF_HOME": str(tmp_path / "d"), "HF_HUB_CACHE": str(tmp_path / "e")}):
        env = {k: v for k, v in os.environ.items()
               if k not in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME")}
        env.update(extra, PYTHONPATH=str(ROOT))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        theirs, ours = out.stdout.split()
        assert theirs == ours, extra


# ------------------------------------------------------------------------------- fetch


def test_fetch_offline_fails_fast_without_network() -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="offline") as err:
        fetch_weights(VITH)
    assert time.monotonic() - start < 5
    assert "lvd models fetch" in str(err.value)
    with pytest.raises(ValueError, match="nothing|no weights"):
        fetch_weights("open_clip:ViT-B-32:none")


def test_fetch_without_network_fails_cleanly(monkeypatch: pytest.MonkeyPatch, net: NetworkAttempts) -> None:
    """Not flagged offline, but no route: a clear WeightsUnavailable within the timeout, not a hang."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    tried: list[object] = []

    def unreachable(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise OSError(101, "Network is unreachable")

    def no_dns(*args: object, **kwargs: object) -> None:
        tried.append(args)
        raise socket.gaierror(-3, "Temporary failure in name resolution")

    monkeypatch.setattr(socket.socket, "connect", unreachable)
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    with pytest.raises(WeightsUnavailable, match="download failed") as err:
        fetch_weights("open_clip:ViT-B-32:laion2b_s34b_b79k", timeout=3)
    assert time.monotonic() - start < 8
    assert tried, "fetch_weights should have tried to download"
    assert "lvd models fetch" in str(err.value)
    assert not list(Path(hf_hub_cache_dir()).rglob("*.bin")) and not list(Path(hf_hub_cache_dir()).rglob("*.safetensors"))
