"""The `lvd` command as a user runs it (subprocess, real entry point)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

LVD = [sys.executable, "-m", "pipeline.cli"]


def _config(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray((rng.random((20, 30, 3)) * 255).astype("uint8")).save(folder / f"{i}.png")
    cfg = tmp_path / "small.yaml"
    cfg.write_text("root: out\nsources:\n  curated: [{name: mine, images: imgs}]\nengine: {shard_rows: 2}\n")
    return cfg


def _lvd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(LVD + list(args), capture_output=True, text=True, timeout=300)


def test_status_stage_status_json(tmp_path):
    cfg = _config(tmp_path)
    out = _lvd("status", "--config", str(cfg), "--json")
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert rows[0]["stage"] == "ingest" and rows[0]["state"] == "missing"
    assert {"stage", "state", "fingerprint", "rows", "path", "seconds"} <= set(rows[0])

    out = _lvd("stage", "ingest", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "ingest" in out.stdout and "done" in out.stdout

    rows = json.loads(_lvd("status", "--config", str(cfg), "--json").stdout)
    ing = rows[0]
    assert ing["state"] == "done" and ing["rows"] == 3 and ing["counts"] == {"status": {"ok": 3}}
    assert Path(ing["path"]).is_relative_to(tmp_path / "out" / "stages" / "ingest")

    table = _lvd("status", "--config", str(cfg)).stdout
    assert table.splitlines()[0].split()[:4] == ["STAGE", "STATE", "FINGERPRINT", "ROWS"]
    assert "ingest by status: ok=3" in table
    import pyarrow.parquet as pq
    assert pq.read_table(ing["path"]).num_rows == 3  # the stage path is a readable Parquet dataset


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("root: out\ningest: {per_host_concurency: 2}\n")
    out = _lvd("status", "--config", str(cfg))
    assert out.returncode == 2
    assert "ingest.per_host_concurency: unknown key" in out.stderr and "Traceback" not in out.stderr


def test_missing_input_says_what_to_fix(tmp_path):
    cfg = tmp_path / "missing.yaml"
    cfg.write_text("root: out\nsources: {uncurated: [{name: web, urls: nowhere.txt}]}\n")
    out = _lvd("run", "--config", str(cfg))
    assert out.returncode == 2 and "nowhere.txt" in out.stderr and "Traceback" not in out.stderr


def test_status_says_when_embedding_weights_are_random(tmp_path):
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + "embed: {model: 'open_clip:ViT-B-32:none'}\n")
    out = _lvd("status", "--config", str(cfg))
    assert out.returncode == 0 and "RANDOM weights" in out.stdout


def test_explain_prints_an_images_trail(tmp_path):
    cfg = _config(tmp_path)
    assert _lvd("stage", "ingest", "--config", str(cfg)).returncode == 0
    url = (tmp_path / "imgs" / "1.png").resolve().as_uri()
    out = _lvd("explain", "--config", str(cfg), url)
    assert out.returncode == 0, out.stderr
    assert "ingest: mine (curated)" in out.stdout and "→ ok" in out.stdout
    missing = _lvd("explain", "--config", str(cfg), "http://example.com/nothing.jpg")
    assert missing.returncode == 1 and "not in any source" in missing.stdout


def _labelled(root: Path) -> None:
    for split in ("train", "val"):
        for cls, rgb in {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 30, 210)}.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (32, 32), tuple(min(255, c + 12 * i) for c in rgb)).save(root / split / cls / f"{i}.png")


def test_eval_a_given_backbone_on_labelled_folders(tmp_path):
    import torch

    from model.export import export_backbone
    from model.layers.vit import build_backbone

    kwargs = {"img_size": 28, "patch_size": 14, "embed_dim": 32, "depth": 1, "num_heads": 2, "init_values": None}
    torch.manual_seed(0)
    export_backbone(build_backbone("vit_test", **kwargs), tmp_path / "export", arch="vit_test", backbone_kwargs=kwargs)
    _labelled(tmp_path / "lab")
    cfg = _config(tmp_path)
    cfg.write_text(cfg.read_text() + "eval: {crop_size: 28, batch_size: 8}\n")
    out = _lvd("eval", "knn", "--config", str(cfg), "--backbone", str(tmp_path / "export"),
               "--train", str(tmp_path / "lab" / "train"), "--val", str(tmp_path / "lab" / "val"),
               "--out", str(tmp_path / "res.json"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == ["MODEL", "METHOD", "SETTING", "TOP1", "TOP5", "N_TRAIN", "N_VAL"]
    assert len(out.stdout.splitlines()) == 3  # k=10 and k=20
    res = json.loads((tmp_path / "res.json").read_text())
    assert res["n_train"] == res["n_val"] == 9 and set(res["knn"]["k"]) == {"10", "20"} and "linear" not in res


def test_eval_without_labelled_folders_says_what_to_set(tmp_path):
    cfg = _config(tmp_path)
    out = _lvd("eval", "linear", "--config", str(cfg), "--backbone", str(tmp_path / "nowhere"))
    assert out.returncode == 2 and "--train DIR and --val DIR" in out.stderr


def test_train_with_an_empty_dataset_says_so(tmp_path):
    cfg = _config(tmp_path)  # curated images only, no retrieval source: the dataset holds the curated ones
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text() + "train: {workers: 0}\n")
    out = _lvd("train", "--config", str(bad))
    assert out.returncode == 2 and "train.workers" in out.stderr
