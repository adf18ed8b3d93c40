"""Kill-anywhere (issue #8 §2): every stage is SIGKILLed at precise and random points, rerun, and must
equal an uninterrupted run — same manifest rows and shard checksums, same artifacts — and a killed
run never leaves a file a reader would take as finished.

One small corpus (local folders: ~40 uncurated photos with near and exact duplicates, 6 curated,
labelled folders for eval) and one uninterrupted reference run of the whole DAG per module. Then,
per stage, on a copy of the reference's upstream stages: a chain of killed subprocess runs
(``tests/killanywhere.py``: a precise write point first — its position is known, so it must be
hit — then a seeded random delay, or for train/distill "after the first checkpoint"), checks of
what each kill left, and a final in-process rerun compared with the reference.
``LVD_KILLANYWHERE_SEEDS=0,1,2`` runs the random points with more seeds (default: 0).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline.config import load_config
from pipeline.engine import Engine, store

import photos
from killanywhere import (KillPoint, finished_shards_match, inspect_killed, json_without, leftover_temporaries,
                          manifests, run_killed)

pytestmark = pytest.mark.integration  # starts Ray, in this process and in every killed subprocess

REPO = Path(__file__).resolve().parent.parent
SEEDS = [int(s) for s in os.environ.get("LVD_KILLANYWHERE_SEEDS", "0").split(",")]
TRAINING = ("train", "distill")
TIMING = frozenset({"images_per_s", "seconds"})  # wall-clock measurements: never equal between two runs

# Precise points first (from a clean unit their position is known, so each must be hit), then a
# random one. ("shard", "renamed", -1) = right after the last shard's rename, before the manifest.
W = KillPoint.write
PLANS: dict[str, list] = {
    # per source: web's 3rd shard half written; then web done (manifest renamed), cur not started;
    # then both done and the stage's published view half written
    "ingest": [("shard", "tmp", 3), ("manifest", "renamed", 1), ("view", "tmp", 1), "delay"],
    "hash_dedup": [("shard", "renamed", 2), "delay"],
    "nsfw": [("shard", "tmp", 4), "delay"],
    "face_blur": [("manifest", "tmp", 1), "delay"],
    "embed": [("shard", "tmp", 3), "delay"],  # killed mid-unit: the rerun embeds only the missing shards
    "copy_dedup": [("shard", "tmp", -1), "delay"],
    "cluster": [("artifact", "tmp", 1), "delay"],  # centroids.npz half written, before any shard
    "retrieve": [("manifest", "tmp", 1), "delay"],
    # after the last shard, before the manifest (the dataset card used to be written here: the rerun failed)
    "dataset": [("shard", "renamed", -1), "delay"],
    # training: one kill each (a killed run costs a Ray Train start): train mid-run after its first
    # checkpoint (resume), distill — the same training loop — with its first exported file half linked
    "train": ["checkpoint"],
    "distill": [("artifact", "tmp", 1)],
    "eval": [("artifact", "tmp", 1), "delay"],  # results.json half written
}


# ------------------------------------------------------------------------------------------- corpus
def _small(name: str, side: int = 192) -> Image.Image:
    im = photos.photo(name)
    s = side / max(im.size)
    return im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.Resampling.BICUBIC)


def build_corpus(root: Path) -> dict[str, Path]:
    """~40 uncurated images (photos, near-duplicate variants, exact copies, synthetic, one broken file),
    6 curated ones (brightened photos), and labelled train/val ImageFolders of 3 classes."""
    web, cur, lab = root / "web", root / "cur", root / "labelled"
    web.mkdir(parents=True)
    cur.mkdir()
    names = sorted(photos.PHOTOS)
    for n in names:
        (web / f"{n}.jpg").write_bytes(photos.jpeg(_small(n), 92))
    for n in names[:4]:
        v = photos.variants(_small(n))
        for k in ("q30", "half", "crop"):
            (web / f"{n}-{k}.jpg").write_bytes(v[k])
    for i, n in enumerate(names[5:7]):
        (web / f"copy-{i}.jpg").write_bytes((web / f"{n}.jpg").read_bytes())
    for i in range(6):
        (web / f"gen-{i}.jpg").write_bytes(photos.generated(i))
    (web / "broken.jpg").write_bytes(b"not an image")
    for n in names[8:14]:
        (cur / f"{n}.jpg").write_bytes(photos.variants(_small(n))["bright"])
    for cls in names[:3]:
        v = photos.variants(_small(cls, 128))
        for split, keys in (("train", ("orig", "q70", "half", "bright")), ("val", ("crop", "q30"))):
            (lab / split / cls).mkdir(parents=True, exist_ok=True)
            for k in keys:
                (lab / split / cls / f"{k}.jpg").write_bytes(v[k])
    return {"web": web, "cur": cur, "train": lab / "train", "val": lab / "val"}


def run_config(corpus: dict[str, Path]) -> dict:
    """Small shards (several per stage); the demo config's tiny train/distill/eval, 6 steps, checkpoints every 2."""
    demo = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    sections = {k: demo[k] for k in ("train", "distill", "eval")}
    for k in TRAINING:
        sections[k].update(checkpoint_every=2, metrics_every=1, knn_every=0)
        sections[k]["ssl"]["train"]["official_epoch_length"] = 3
        sections[k]["ssl"]["optim"]["epochs"] = 2
    sections["eval"].update(train=str(corpus["train"]), val=str(corpus["val"]))
    return {
        "name": "killanywhere", "root": "out",
        "sources": {"uncurated": [{"name": "web", "images": str(corpus["web"])}],
                    "curated": [{"name": "cur", "images": str(corpus["cur"])}]},
        "engine": {"shard_rows": 8},
        "hash_dedup": {"radius": 12, "concurrency": 1},
        "nsfw": {"concurrency": 1, "batch_size": 8},
        "face_blur": {"concurrency": 1, "batch_size": 8},
        "embed": {"model": "timm:test_vit:none", "batch_size": 8, "concurrency": 1},  # tiny, random weights
        "copy_dedup": {"k": 8, "threshold": 0.99, "eval_threshold": 0.95},
        "cluster": {"n_clusters": 4},
        "retrieve": {"min_hits": 0, "per_cluster": 6},
        **sections,
    }


@dataclass
class Reference:
    corpus: dict[str, Path]
    config: dict
    dir: Path
    engine: Engine
    manifests: dict[str, dict[str, dict]]  # stage → unit label → manifest
    views: dict[str, dict | None]  # per-source stages: the published view's manifest

    def fresh_root(self, where: Path, stage: str) -> Engine:
        """A run folder holding copies of ``stage``'s upstream stages, and ``stage`` not yet run."""
        where.mkdir(parents=True, exist_ok=True)
        for up in self.engine.upstream_closure(stage)[:-1]:
            shutil.copytree(self.dir / "out" / "stages" / up, where / "out" / "stages" / up)
        cfg = where / "run.yaml"
        cfg.write_text(yaml.safe_dump(self.config, sort_keys=False))
        return Engine(load_config(cfg), show_progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, ray_session) -> Reference:
    root = tmp_path_factory.mktemp("killanywhere")
    corpus = build_corpus(root / "corpus")
    config = run_config(corpus)
    (root / "reference").mkdir()
    (root / "reference" / "run.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    eng = Engine(load_config(root / "reference" / "run.yaml"), show_progress=False)
    eng.run()
    views = {s: store.read_manifest(eng.stage_dir(s)) if eng.stage(s).per_source else None for s in eng.stage_names()}
    ref = Reference(corpus, config, root / "reference", eng, {s: manifests(eng, s) for s in eng.stage_names()}, views)
    assert ref.manifests["cluster"]["cluster"]["rows"] > 0 and ref.manifests["dataset"]["dataset"]["rows"] > 0
    return ref


# ------------------------------------------------------------------------------------------- checks
def _points(stage: str, ref: Reference, seed: int) -> list[KillPoint]:
    units = ref.manifests[stage]
    seconds = sum(m["seconds"] for m in units.values())
    out = []
    for p in PLANS[stage]:
        if p == "delay":
            out.append(KillPoint.delay(f"{stage}:{seed}", upto=max(0.5, seconds)))
        elif p == "checkpoint":  # as soon as the first checkpoint is published, plus a little
            out.append(KillPoint.file("*/work/checkpoints/latest", f"{stage}:{seed}", upto=0.3))
        else:
            what, phase, nth = p
            if nth < 0:
                nth = sum(len(m["shards"]) for m in units.values()) + 1 + nth
            out.append(W(what, phase, nth))
    return out


def _rows(path: Path, root: Path) -> list[dict]:
    """A shard's rows without wall-clock columns, this run's root in strings (eval's `checkpoint`) as <root>."""
    t = pq.read_table(path)
    rows = t.drop_columns([c for c in TIMING if c in t.column_names]).to_pylist()
    return [{k: v.replace(str(root), "<root>") if isinstance(v, str) else v for k, v in r.items()} for r in rows]


def _same_shard(ref: Reference, stage: str, eng: Engine):
    """How a part file left by a killed run is compared with the reference's (None: byte for byte)."""
    if stage not in TRAINING and stage != "eval":
        return None
    return lambda unit, path, entry: _rows(path, eng.config.root) == _rows(
        ref.engine.config.stages_dir / stage / unit.fingerprint / entry["file"], ref.engine.config.root)


def assert_equal_to_reference(eng: Engine, stage: str, ref: Reference) -> None:
    """Same units, fingerprints, inputs, shard rows and checksums, counts and artifacts as the reference.

    train/distill record wall-clock throughput (``images_per_s`` in the metrics rows and summary.json),
    and eval records timings and the export folder it read (under each run's root); those fields are
    left out and everything else — the exported backbones bit for bit, every loss value — must match."""
    got, want = manifests(eng, stage), ref.manifests[stage]
    assert got.keys() == want.keys()
    here, there = eng.config.root, ref.engine.config.root
    for label, b in want.items():
        a = got[label]
        for key in ("fingerprint", "inputs", "rows", "counts", "config"):
            assert a[key] == b[key], f"{label}: {key} differs"
        assert [(e["file"], e["rows"]) for e in a["shards"]] == [(e["file"], e["rows"]) for e in b["shards"]]
        a_dir = eng.config.stages_dir / stage / a["fingerprint"]
        b_dir = ref.engine.config.stages_dir / stage / b["fingerprint"]
        if stage in TRAINING or stage == "eval":
            for ea, eb in zip(a["shards"], b["shards"]):
                assert _rows(a_dir / ea["file"], here) == _rows(b_dir / eb["file"], there), f"{label}: {ea['file']}"
            assert a["artifacts"].keys() == b["artifacts"].keys()
            for name in a["artifacts"]:
                if name.endswith(".json"):
                    assert json_without((a_dir / name).read_bytes(), TIMING, {str(here): "<root>"}) == \
                        json_without((b_dir / name).read_bytes(), TIMING, {str(there): "<root>"}), f"{label}: {name}"
                else:
                    assert a["artifacts"][name] == b["artifacts"][name], f"{label}: {name} differs"
        else:
            assert a["shards"] == b["shards"], f"{label}: shard checksums differ"
            assert a["content"] == b["content"] and a["artifacts"] == b["artifacts"], label
    if eng.stage(stage).per_source:
        assert store.read_manifest(eng.stage_dir(stage)) == ref.views[stage]


# --------------------------------------------------------------------------------------------- test
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("stage", list(PLANS))
def test_kill_anywhere(stage, seed, reference, tmp_path):
    eng = reference.fresh_root(tmp_path, stage)
    assert eng.stage_names() == list(PLANS)  # every stage that exists has a plan
    assert eng.status(stage).state == "missing"
    stage_dir = eng.config.stages_dir / stage
    log = []
    for i, point in enumerate(_points(stage, reference, seed)):
        before = inspect_killed(eng, stage) if i else None
        res = run_killed(eng.config.path, stage, point, stage_dir=stage_dir)
        log.append(f"{point}: {res.message} ({res.seconds:.1f}s)")
        print(f"{stage}: {log[-1]}", flush=True)
        if point.how == "write" and not (before and all(s == "done" for s in before.values())):
            assert res.killed and res.message.startswith(f"{point.what} #{point.nth} "), (point, res.tail())
        states = inspect_killed(eng, stage)
        finished_shards_match(eng, stage, reference.manifests[stage], same=_same_shard(reference, stage, eng))
        before_manifest = point.what != "view" and (point.what, point.phase) != ("manifest", "renamed")
        if res.killed and point.how == "write" and before_manifest:
            assert not all(s == "done" for s in states.values()), states  # killed before its manifest
    eng = Engine(load_config(eng.config.path), show_progress=False)  # the rerun, in-process
    assert eng.ensure(stage).state == "done"
    assert set(inspect_killed(eng, stage).values()) == {"done"}
    assert leftover_temporaries(eng, stage) == []  # the rerun cleared what the kills left in its units
    assert_equal_to_reference(eng, stage, reference)
    stray = sorted(p.name for p in stage_dir.iterdir() if p.name.startswith(store.TMP_PREFIX))
    assert stray == [], f"{stage}: left beside the units: {stray}"  # e.g. a killed view publish's folder
    print(f"{stage}: " + "; ".join(log))
