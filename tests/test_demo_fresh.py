"""The README's main command as a newcomer runs it: `bash infra/demo.sh` in a clean copy of the
repository (what a clone of this tree holds) with an empty HOME, sharing only pip's cache; run twice.

Asserts: the deployment's flow run ends Completed, the status table lists every stage `done`, and
the second run sends no HTTP request to the demo corpus. Ports are free ones, so a developer's own
servers on the default ports are left alone. Its output is saved to tests/artifacts/demo-fresh-*.txt.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from photos import artifacts_dir
from prefect_server import free_port

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup", "cluster", "retrieve", "dataset",
          "train", "distill", "eval")
DEMO_TIMEOUT_S = 2400  # fresh venv (torch from pip's cache) + the whole DAG on 2 cores

pytestmark = [pytest.mark.integration, pytest.mark.timeout(2 * DEMO_TIMEOUT_S + 300)]


def _clean_copy(dest: Path) -> None:
    """The files a clone of this working tree would have: tracked and untracked-but-not-ignored."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():  # deleted but still tracked files are skipped
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def _pip_cache_dir() -> str:
    return subprocess.run([sys.executable, "-m", "pip", "cache", "dir"], check=True, capture_output=True,
                          text=True).stdout.strip()


def _newcomer_env(home: Path) -> dict[str, str]:
    keep = ("PATH", "LANG", "LC_ALL", "TERM", "TMPDIR", "CI")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(HOME=str(home), PIP_CACHE_DIR=_pip_cache_dir())
    # free ports: the developer's own demo (default ports) may be running
    for var in ("PREFECT_PORT", "LVD_CORPUS_PORT", "LVD_DASHBOARD_PORT", "RAY_DASHBOARD_PORT", "RAY_HEAD_PORT"):
        env[var] = str(free_port())
    return env


def _demo(repo: Path, env: dict[str, str], name: str) -> str:
    proc = subprocess.run(["bash", "infra/demo.sh"], cwd=repo, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=DEMO_TIMEOUT_S)
    (artifacts_dir() / f"demo-fresh-{name}.txt").write_text(proc.stdout)
    assert proc.returncode == 0, f"bash infra/demo.sh exited {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc.stdout


def _stage_states(out: str) -> dict[str, str]:
    """STAGE → STATE from the `lvd status` table in the output."""
    states = {}
    for line in out.splitlines():
        parts = line.split()  # table rows only: not the "  ingest by status: ..." count lines below it
        if len(parts) >= 6 and parts[0] in STAGES and parts[1] in ("done", "partial", "missing"):
            states[parts[0]] = parts[1]
    return states


def _requests(out: str) -> int:
    found = re.findall(r"demo corpus server received (\d+) HTTP request", out)
    assert found, out[-3000:]
    return int(found[-1])


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    base = tmp_path_factory.mktemp("fresh")
    repo, home = base / "repo", base / "home"
    repo.mkdir()
    home.mkdir()
    _clean_copy(repo)
    env = _newcomer_env(home)
    try:
        first = _demo(repo, env, "first")
        second = _demo(repo, env, "second")
    finally:  # whatever a failed run left behind
        subprocess.run(["bash", "infra/serve.sh", "stop"], cwd=repo, env=env, capture_output=True, timeout=300)
    return repo, home, first, second


def test_first_run_completes_every_stage(fresh) -> None:
    repo, home, first, _ = fresh
    assert re.search(r"\bCompleted\b", first), first[-3000:]
    assert _stage_states(first) == {stage: "done" for stage in STAGES}, first[-3000:]
    assert _requests(first) > 0
    assert (repo / "runs" / ".ray" / "auth_token").is_file()  # the demo's own Ray token, not one in HOME
    assert not (home / ".ray").exists()


def test_first_run_curates_with_real_features_and_trains(fresh) -> None:
    """The outputs on disk: the demo's ground truth is recovered, and train → distill → eval ran in the flow."""
    repo, _, first, _ = fresh
    assert "retrieval precision@4: 1.00" in first and "copies: one image kept of 8/8" in first, first[-3000:]
    code = (
        "import json; from pipeline.config import load_config; from pipeline.engine import Engine\n"
        "e = Engine(load_config('configs/demo.yaml'), show_progress=False)\n"
        "m = e.read_table('train').to_pylist()\n"
        "print(json.dumps({'steps': [r['step'] for r in m], 'crop': m[-1]['global_crops_size'],\n"
        "  'knn': [r['knn_top1'] for r in m if r['knn_top1'] is not None],\n"
        "  'train': json.loads(e.read_artifact('train', 'model.json')),\n"
        "  'dataset_fp': e.stage_fingerprint('dataset'),\n"
        "  'distill': json.loads(e.read_artifact('distill', 'model.json')),\n"
        "  'eval': e.read_table('eval', columns=['model', 'method', 'setting', 'top1', 'n_classes']).to_pylist(),\n"
        "  'embed': e.read_table('embed', columns=['model']).column('model').unique().to_pylist()}))\n")
    out = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", code], cwd=repo, check=True,
                         capture_output=True, text=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    assert got["embed"] and all(m.startswith("timm:efficientnet_lite0:package@sha256:") for m in got["embed"])
    assert got["steps"] == sorted(got["steps"]) and got["crop"] == 70 and got["knn"]  # high-res phase; online kNN
    assert got["train"]["dataset_fingerprint"] == got["dataset_fp"] and got["train"]["arch"] == "vit_test"
    assert got["distill"]["embed_dim"] == 32  # the smaller student
    rows = got["eval"]
    assert {(r["model"], r["method"], r["setting"]) for r in rows} >= {
        ("train", "knn", "k=10"), ("train", "knn", "k=20"), ("distill", "knn", "k=10"), ("distill", "knn", "k=20")}
    assert {(r["model"], r["method"]) for r in rows if r["method"] == "linear"} == {("train", "linear"),
                                                                                  ("distill", "linear")}
    assert all(0.0 <= r["top1"] <= 1.0 and r["n_classes"] == 6 for r in rows)


def test_second_run_sends_no_http_request(fresh) -> None:
    _, _, _, second = fresh
    assert re.search(r"\bCompleted\b", second), second[-3000:]
    assert _stage_states(second) == {stage: "done" for stage in STAGES}
    assert _requests(second) == 0
