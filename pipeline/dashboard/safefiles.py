"""The one rule for files the dashboard serves: a regular file whose real path is inside the run root."""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

# Run outputs that may be downloaded as they are (manifests, the dataset card and summary, centroids).
# Parquet shards are not served: they hold unblurred and NSFW image bytes.
SERVED_TYPES = {
    ".json": "application/json",
    ".md": "text/markdown; charset=utf-8",
    ".txt": "text/plain; charset=utf-8",
    ".csv": "text/csv; charset=utf-8",
    ".npz": "application/octet-stream",
}


def resolve_under(root: Path | str, relative: str) -> Path | None:
    """``root/relative`` when it is a regular file whose realpath (symlinks followed) is inside
    realpath(root); None for absolute paths, ``..`` segments, NUL bytes, backslashes, or anything
    that resolves outside the root."""
    if not relative or "\x00" in relative or "\\" in relative or relative.startswith("/"):
        return None
    parts = PurePosixPath(relative).parts
    if any(p in ("..", ".") for p in parts):
        return None
    base = os.path.realpath(root)
    target = os.path.realpath(os.path.join(base, *parts))
    try:
        if os.path.commonpath([base, target]) != base:
            return None
    except ValueError:
        return None
    return Path(target) if os.path.isfile(target) else None


def served_type(path: Path) -> str | None:
    """The media type a run file is served with, or None when files of its kind are not served."""
    return SERVED_TYPES.get(path.suffix.lower())
