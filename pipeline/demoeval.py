"""How well a run over the demo corpus recovers what the corpus knows about itself.

The demo corpus (``pipeline.democorpus``) records photo families in ``manifest.json``: each family
photo has an original, four quadrant views (distinct images of the same scene: every dedup stage
should keep them) and copies (mirrored / rotated re-encodes: hash_dedup or copy_dedup should
remove them); the curated set is the family photos. From a run's stage outputs this reports:

* retrieval precision@k: for each curated photo, the share of its k best sample-based hits that
  are images of its own family;
* copies collapsed: of each family photo and its copies (truth ``copy_of``: re-encodes, resizes,
  small crops, mirrors, rotations) exactly one image is kept; views kept (else by which stage);
* cluster purity: over the family images that reach ``cluster``, the share sitting in a cluster
  whose majority family is their own; and how many clusters each family spans.

``python -m pipeline.demoeval --config configs/demo.yaml`` prints the report (the demo does).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["DemoReport", "evaluate_demo", "family_of_urls", "main"]

FILTER_STAGES = ("hash_dedup", "nsfw", "copy_dedup")


@dataclass
class DemoReport:
    """Ground-truth checks of one run (see the module docstring)."""

    k: int = 0
    precision: dict[str, float] = field(default_factory=dict)  # curated photo → precision@k
    copies_kept: dict[str, list[str]] = field(default_factory=dict)  # family photo → kept URLs of it and its copies
    copies_removed_by: dict[str, int] = field(default_factory=dict)  # stage → copies it removed
    views_removed: dict[str, str | None] = field(default_factory=dict)  # view URL → removing stage (None: kept)
    purity: float | None = None
    clusters_per_family: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def mean_precision(self) -> float | None:
        return sum(self.precision.values()) / len(self.precision) if self.precision else None

    def lines(self) -> list[str]:
        """The report as short lines for a terminal."""
        out = []
        if self.precision:
            worst = min(self.precision, key=self.precision.get)
            low = f" (lowest: {worst} {self.precision[worst]:.2f})" if self.precision[worst] < 1 else ""
            out.append(f"retrieval precision@{self.k}: {self.mean_precision:.2f} over {len(self.precision)} curated "
                       f"photos{low}")
        one = sum(len(kept) == 1 for kept in self.copies_kept.values())
        by = ", ".join(f"{s} {n}" for s, n in sorted(self.copies_removed_by.items())) or "none"
        out.append(f"copies: one image kept of {one}/{len(self.copies_kept)} photos and their copies "
                   f"(removed by {by})")
        kept = sum(stage is None for stage in self.views_removed.values())
        lost = {Path(urlsplit(u).path).name: s for u, s in self.views_removed.items() if s}
        out.append(f"views kept: {kept}/{len(self.views_removed)}" + (f" (removed: {lost})" if lost else ""))
        if self.purity is not None:
            spans = ", ".join(f"{f} {n}" for f, n in sorted(self.clusters_per_family.items()))
            out.append(f"cluster purity: {self.purity:.2f} (clusters per family: {spans})")
        return out + self.notes


def family_of_urls(manifest: dict) -> dict[str, tuple[str, str]]:
    """URL → (family photo, role) from the corpus manifest; role original | view | copy, or derived
    for the photo's other images (near-duplicates, mirrors, crops in the WARC)."""
    families = manifest["truth"].get("families", {})
    out: dict[str, tuple[str, str]] = {u: (name, "derived") for u, name in manifest["truth"].get("derived_from", {}).items()
                                       if name in families}
    for name, fam in families.items():
        out[fam["original"]] = (name, "original")
        out.update({u: (name, "view") for u in fam["views"]})
        out.update({u: (name, "copy") for u in fam["copies"]})
    return out


def _done(engine, stage: str) -> bool:
    return stage in engine.stage_names() and engine.status(stage).state == "done"


def _curated_photo(url: str | None) -> str | None:
    return Path(urlsplit(url).path).stem if url else None


def evaluate_demo(engine, manifest: dict, k: int | None = None) -> DemoReport:
    """The report for the run of ``engine`` (an ``pipeline.engine.Engine``) over the corpus of ``manifest``."""
    families = family_of_urls(manifest)
    report = DemoReport()
    if not families:
        report.notes.append("the corpus manifest has no photo families (rebuild it with `lvd demo-corpus`)")
        return report
    cfg = engine.config
    family_of: dict[str, str] = {}  # uncurated image_id → family
    url_of: dict[str, str] = {}
    for src in cfg.sources.uncurated:
        for row in engine.read_table("ingest", src.name, ["image_id", "url", "status"]).to_pylist():
            if row["status"] == "ok" and row["url"] in families:
                family_of[row["image_id"]] = families[row["url"]][0]
                url_of[row["image_id"]] = row["url"]
    removed_by: dict[str, str] = {}
    for stage in FILTER_STAGES:
        if _done(engine, stage):
            for row in engine.read_table(stage, columns=["image_id", "decision"]).to_pylist():
                if row["decision"] == "removed":
                    removed_by.setdefault(row["image_id"], stage)
    roles = {url_of[i]: (families[url_of[i]][1], removed_by.get(i)) for i in url_of}
    report.views_removed = {u: s for u, (role, s) in sorted(roles.items()) if role == "view"}
    copy_of = manifest["truth"].get("copy_of", {})
    report.copies_removed_by = dict(Counter(s for u, (_, s) in roles.items() if s and u in copy_of))
    for name, fam in manifest["truth"]["families"].items():
        group = {fam["original"]} | {u for u, photo in copy_of.items() if photo == name}
        report.copies_kept[name] = sorted(u for u, (_, s) in roles.items() if u in group and s is None)

    if _done(engine, "retrieve"):
        curated = {}
        for src in cfg.sources.curated:
            for row in engine.read_table("ingest", src.name, ["image_id", "url"]).to_pylist():
                curated[row["image_id"]] = _curated_photo(row["url"])
        hits: dict[str, list[tuple[int, str]]] = defaultdict(list)
        for row in engine.read_table("retrieve", columns=["image_id", "query_id", "rank", "method"]).to_pylist():
            if row["method"] == "sample" and row["query_id"] in curated:
                hits[row["query_id"]].append((row["rank"], row["image_id"]))
        report.k = k or cfg.retrieve.k
        for qid, ranked in sorted(hits.items()):
            photo = curated[qid]
            if photo not in manifest["truth"]["families"]:
                continue
            top = [i for _, i in sorted(ranked)[:report.k]]
            report.precision[photo] = sum(family_of.get(i) == photo for i in top) / report.k
        if not hits:
            report.notes.append("retrieval was cluster-based: precision@k needs `retrieve.method: sample`")

    if _done(engine, "cluster"):
        members: dict[int, Counter] = defaultdict(Counter)
        for row in engine.read_table("cluster", columns=["image_id", "cluster"]).to_pylist():
            if row["image_id"] in family_of:
                members[row["cluster"]][family_of[row["image_id"]]] += 1
        total = sum(sum(c.values()) for c in members.values())
        if total:
            report.purity = sum(max(c.values()) for c in members.values()) / total
            spans: Counter = Counter()
            for c in members.values():
                spans.update(c.keys())
            report.clusters_per_family = dict(spans)
    return report


def _manifest_for(config) -> Path:
    """The demo corpus manifest next to the first uncurated source's URL list."""
    for src in config.sources.uncurated:
        if src.urls:
            return Path(src.urls).parent / "manifest.json"
    raise ValueError("the config has no uncurated URL list: which demo corpus is this? (give --manifest)")


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from pipeline.engine import Engine

    parser = argparse.ArgumentParser(prog="python -m pipeline.demoeval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the run's config (e.g. configs/demo.yaml)")
    parser.add_argument("--manifest", help="the corpus manifest.json (default: next to the URL list)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    manifest_path = Path(args.manifest) if args.manifest else _manifest_for(config)
    manifest = json.loads(manifest_path.read_text())
    for line in evaluate_demo(Engine(config, show_progress=False), manifest).lines():
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
