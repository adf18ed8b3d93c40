"""The engine's on-disk store: atomic writes, temporaries, published views."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.engine import store


def _links(tmp_path: Path, n: int) -> list[tuple[Path, Path]]:
    unit = tmp_path / "stages" / "s" / "unitfp"
    out = []
    for i in range(n):
        store.atomic_write_bytes(unit / store.shard_name(i), f"shard {i}".encode())
        out.append((Path("src") / store.shard_name(i), unit / store.shard_name(i)))
    return out


def test_atomic_write_leaves_no_temporary(tmp_path):
    store.atomic_write_json(tmp_path / "a.json", {"x": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1}


def test_clean_temporaries_removes_files_and_folders(tmp_path):
    (tmp_path / f"{store.TMP_PREFIX}abc-part-00000.parquet").write_bytes(b"half")
    (tmp_path / f"{store.TMP_PREFIX}trash-1").mkdir()
    (tmp_path / "part-00001.parquet").write_bytes(b"done")
    assert store.clean_temporaries(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["part-00001.parquet"]


def test_publish_view_sweeps_what_a_killed_publisher_left(tmp_path):
    links = _links(tmp_path, 2)
    view = tmp_path / "stages" / "s" / "viewfp"
    # a publisher killed half-way through building, and one killed between moving the old view away and the rename
    half = view.with_name(f"{store.TMP_PREFIX}1234abcd-{view.name}")
    (half / "src").mkdir(parents=True)
    (half / "src" / "part-00000.parquet").write_bytes(b"partial")
    trash = view.with_name(f"{store.TMP_PREFIX}trash-1-abcdef-{view.name}")
    trash.mkdir()
    other = view.with_name(f"{store.TMP_PREFIX}1234abcd-otherfp")  # another view's publish: not ours to sweep
    other.mkdir()
    store.publish_view(view, {"rows": 2}, links)
    assert not half.exists() and not trash.exists() and other.exists()
    assert store.read_manifest(view) == {"rows": 2}
    assert (view / "src" / "part-00001.parquet").read_bytes() == b"shard 1"
    # republishing an unchanged view is a no-op; a changed one replaces it whole
    store.publish_view(view, {"rows": 2}, links)
    store.publish_view(view, {"rows": 1}, links[:1])
    assert sorted(p.name for p in (view / "src").iterdir()) == ["part-00000.parquet"]
    leftovers = [p.name for p in view.parent.iterdir() if p.name.startswith(store.TMP_PREFIX)]
    assert leftovers == [other.name]


def test_clear_unit_forgets_manifest_shards_and_work(tmp_path):
    unit = tmp_path / "u"
    store.write_shard(unit, 0, pa.table({"a": [1]}))
    store.atomic_write_json(unit / store.MANIFEST, {"done": True})
    (unit / store.WORK_DIR).mkdir()
    (unit / store.WORK_DIR / "ckpt").write_text("x")
    store.clear_unit(unit)
    assert store.read_manifest(unit) is None and not list(unit.glob("part-*")) and not (unit / store.WORK_DIR).exists()
