"""`lvd explain`: one image's whole trail through the stages, from the engine's tables."""
from __future__ import annotations

from typing import Any

import pyarrow.compute as pc

from pipeline.engine import Engine
from pipeline.sources import image_id_for

TRAIL_COLUMNS = {
    "ingest": ["image_id", "url", "source", "kind", "status", "error", "width", "height", "final_url", "http_status"],
    "face_blur": ["image_id", "faces", "face_boxes"],
    "embed": ["image_id", "model"],
    "cluster": ["image_id", "cluster", "similarity", "clusters"],
    "dataset": ["image_id", "origin", "cluster"],
}


def _rows(engine: Engine, stage: str, column: str, value: str, columns: list[str] | None = None) -> list[dict]:
    if stage not in engine.registry or engine.status(stage).state != "done":
        return []
    out = []
    for t in engine.read(stage, columns=columns):
        out += t.filter(pc.equal(t[column], value)).to_pylist()
    return out


def explain(engine: Engine, key: str) -> dict[str, Any]:
    """Everything the done stages know about one image, given its image_id or its URL."""
    image_id = key if len(key) == 64 and all(c in "0123456789abcdef" for c in key) else image_id_for(key)
    trail: dict[str, Any] = {"image_id": image_id}
    for stage in engine.stage_names():
        st = engine.stage(stage)
        if st.output == "decisions":
            trail[stage] = _rows(engine, stage, "image_id", image_id)
        elif stage == "retrieve":
            trail["retrieved_by"] = _rows(engine, stage, "image_id", image_id)
            trail["retrieved"] = _rows(engine, stage, "query_id", image_id)
        elif stage in TRAIL_COLUMNS:
            trail[stage] = _rows(engine, stage, "image_id", image_id, TRAIL_COLUMNS[stage])
    return trail


def format_trail(trail: dict[str, Any]) -> str:
    """The trail as the lines `lvd explain` prints."""
    lines = [f"image {trail['image_id']}"]
    ing = trail.get("ingest") or []
    if not ing:
        return "\n".join(lines + ["  not in any source of this run (check the id or URL; run `lvd status`)"])
    for r in ing:
        lines.append(f"  ingest: {r['source']} ({r['kind']}) {r['url']} → {r['status']}"
                     + (f" ({r['error']})" if r["error"] else f", {r['width']}×{r['height']}"))
    for stage in ("hash_dedup", "nsfw", "copy_dedup"):
        for r in trail.get(stage) or []:
            why = "" if r["decision"] == "kept" else f" — {r['reason']}"
            ref = f", duplicate of {r['ref_id']}" if r.get("ref_id") else ""
            score = f", score {r['score']:.3f}" if r.get("score") is not None else ""
            lines.append(f"  {stage}: {r['decision']}{why}{ref}{score}")
    for r in trail.get("face_blur") or []:
        lines.append(f"  face_blur: {r['faces']} face(s) blurred" + (f" at {r['face_boxes']}" if r["faces"] else ""))
    for r in trail.get("embed") or []:
        lines.append(f"  embed: {r['model']}")
    for r in trail.get("cluster") or []:
        lines.append(f"  cluster: {r['cluster']} (cosine to centroid {r['similarity']:.3f})")
    for r in trail.get("retrieved_by") or []:
        q = r["query_id"] or "(cluster-level)"
        lines.append(f"  retrieved by {r['query_source']} query {q}: {r['method']}, rank {r['rank']}, "
                     f"similarity {r['similarity']:.3f}")
    if trail.get("retrieved"):
        lines.append(f"  as a query it retrieved {len(trail['retrieved'])} image(s)")
    ds = trail.get("dataset") or []
    lines.append("  dataset: " + (f"in, as {ds[0]['origin']}" if ds else "not in the dataset"))
    return "\n".join(lines)
