"""The dashboard serves only regular files whose real path is inside the run root."""
from __future__ import annotations

import os

from pipeline.dashboard.safefiles import resolve_under, served_type


def test_resolve_under_refuses_traversal_absolute_and_symlinks_out(tmp_path) -> None:
    root = tmp_path / "run"
    (root / "stages" / "x").mkdir(parents=True)
    inside = root / "stages" / "x" / "_manifest.json"
    inside.write_text("{}")
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (root / "link-out.json").symlink_to(secret)
    (root / "dir-out").symlink_to(tmp_path)
    (root / "link-in.json").symlink_to(inside)

    assert resolve_under(root, "stages/x/_manifest.json") == inside.resolve()
    assert resolve_under(root, "link-in.json") == inside.resolve()       # a symlink that stays inside
    assert resolve_under(root, "./stages/x/_manifest.json") == inside.resolve()
    for bad in ["../secret.json", "stages/../../secret.json", "/etc/passwd", str(secret), "link-out.json",
                "dir-out/secret.json", "stages\\..\\..\\secret.json", "stages/x/\x00.json", "", "stages", ".",
                "stages/x/missing.json"]:
        assert resolve_under(root, bad) is None, bad


def test_resolve_under_a_symlinked_root(tmp_path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.json").write_text("{}")
    os.symlink(real, tmp_path / "alias")
    assert resolve_under(tmp_path / "alias", "a.json") == (real / "a.json").resolve()


def test_only_metadata_files_are_served() -> None:
    from pathlib import Path

    assert served_type(Path("x/_manifest.json")) == "application/json"
    assert served_type(Path("x/dataset_card.md")).startswith("text/markdown")
    assert served_type(Path("x/part-00000.parquet")) is None   # shards hold unblurred / NSFW bytes
    assert served_type(Path("x/thumb.jpg")) is None
