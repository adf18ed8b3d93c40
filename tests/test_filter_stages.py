"""`nsfw` and `face_blur` as stages on Ray Data, and the kept-images helper over all three filters."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from photos import generated, jpeg, photo
from pipeline.config import parse_config
from pipeline.engine import REGISTRY, Engine, Shard, Stage, StageContext, register
from pipeline.engine.stage import load_builtin_stages

FACE_REGION = (150, 50, 290, 220)  # x0, y0, x1, y1 around the astronaut's face (512×512)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("filters") / "web"
    d.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (d / f"{name}.jpg").write_bytes(jpeg(photo(name), 95))
    (d / "astronaut-copy.jpg").write_bytes((d / "astronaut.jpg").read_bytes())
    for seed in range(3):
        (d / f"gen-{seed}.jpg").write_bytes(generated(seed))
    return d


def _engine(root: Path, folder: Path, registry=None, **sections) -> Engine:
    cfg = parse_config({"root": str(root), "sources": {"uncurated": [{"name": "web", "images": str(folder)}],
                                                       "curated": [{"name": "cur", "images": str(folder)}]},
                        "engine": {"shard_rows": 3}, **sections}, base=root)
    return Engine(cfg, show_progress=False, registry=registry)


def _by_name(eng: Engine, stage: str, **kw) -> dict[str, dict]:
    urls = {r["image_id"]: Path(r["url"]).stem for r in eng.read_table("ingest", "web", ["image_id", "url"]).to_pylist()}
    return {urls[r["image_id"]]: r for r in eng.read_table(stage, **kw).to_pylist()}


def test_nsfw_scores_threshold_and_decisions(tmp_path, folder, ray_session):
    eng = _engine(tmp_path, folder, nsfw={"threshold": 0.02, "batch_size": 2})
    st = eng.ensure("nsfw")
    rows = _by_name(eng, "nsfw")
    assert set(rows) == {"astronaut", "astronaut-copy", "coffee", "chelsea", "gen-0", "gen-1", "gen-2"}
    assert all(0.0 <= r["score"] <= 1.0 and r["stage"] == "nsfw" for r in rows.values())
    assert max(r["score"] for r in rows.values()) < 0.2  # real, benign photos
    # the (deliberately low) threshold is applied exactly: removed iff score > threshold
    for r in rows.values():
        assert (r["decision"] == "removed") == (r["score"] > 0.02) and r["reason"] == ("nsfw" if r["score"] > 0.02 else None)
    assert rows["astronaut"]["decision"] == "removed" and rows["chelsea"]["decision"] == "kept"
    assert [u.partition.name for u in eng.units("nsfw")] == ["web"]  # curated sources are not filtered
    assert st.counts["decision"]["removed"] >= 1
    assert not eng.ensure("nsfw").computed
    # a different threshold is a different fingerprint; batch size is not
    assert _engine(tmp_path, folder, nsfw={"threshold": 0.5}).stage_fingerprint("nsfw") != st.fingerprint
    assert _engine(tmp_path, folder, nsfw={"threshold": 0.02, "batch_size": 7}).stage_fingerprint("nsfw") == st.fingerprint


def _gray(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)


def test_face_blur_blurs_the_astronauts_face_only(tmp_path, folder, ray_session):
    eng = _engine(tmp_path, folder, face_blur={"batch_size": 2})
    eng.ensure("face_blur")
    blurred = _by_name(eng, "face_blur")
    original = _by_name(eng, "ingest", partition="web")
    astro = blurred["astronaut"]
    assert astro["faces"] >= 1
    x, y, w, h = astro["face_boxes"][0]
    x0, y0, x1, y1 = FACE_REGION
    assert x < x1 and x + w > x0 and y < y1 and y + h > y0, "the box lies on the face"
    before, after = _gray(original["astronaut"]["image"]), _gray(astro["image"])
    inside = np.abs(before[y:y + h, x:x + w] - after[y:y + h, x:x + w]).mean()
    far = np.abs(before[400:, 400:] - after[400:, 400:]).mean()
    assert inside > 10 and far < 1.5, (inside, far)
    assert astro["sha256"] != original["astronaut"]["sha256"]
    for name in ("coffee", "chelsea", "gen-0"):  # no face: bytes untouched
        assert blurred[name]["faces"] == 0 and blurred[name]["image"] == original[name]["image"]
    assert {r["status"] for r in blurred.values()} == {"ok"}


class Probe(Stage):
    """A stand-in for the first stage that reads kept images (embed's position in the DAG)."""

    name = "probe"
    upstream = ("hash_dedup", "nsfw", "face_blur")
    schema = pa.schema([("image_id", pa.string())])

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        yield 0, pa.concat_tables(ctx.engine.kept("probe", "web", ["image_id"]))


def test_kept_images_compose_all_filters(tmp_path, folder, ray_session):
    load_builtin_stages()
    registry = dict(REGISTRY)
    register(Probe, registry)
    eng = _engine(tmp_path, folder, registry, nsfw={"threshold": 0.02}, hash_dedup={"radius": 12})
    eng.ensure("probe")
    names = {r["image_id"]: Path(r["url"]).stem for r in eng.read_table("ingest", "web", ["image_id", "url"]).to_pylist()}
    kept = {names[i] for i in eng.read_table("probe")["image_id"].to_pylist()}
    removed = {names[r["image_id"]] for s in ("hash_dedup", "nsfw") for r in eng.read_table(s).to_pylist()
               if r["decision"] == "removed"}
    assert kept == set(names.values()) - removed
    assert "astronaut-copy" in removed or "astronaut" in removed  # exact duplicates
    blurred = {r["image_id"]: r for r in eng.read_table("face_blur").to_pylist()}
    rows = pa.concat_tables(eng.kept("probe", "web")).to_pylist()
    assert all(r["image"] == blurred[r["image_id"]]["image"] for r in rows)  # face_blur's bytes, not ingest's
    curated = pa.concat_tables(eng.kept("probe", "cur", ["image_id"]))
    assert curated.num_rows == 7  # curated sources are not filtered
