"""Multi-node on one machine, for real (issue #8 §1): a Ray head and a worker node as separate processes.

``tests/raycluster.py`` starts ``ray start --head`` and ``ray start --address=127.0.0.1:<port>``
(1 CPU each, their own object stores and temp dirs). The pipeline joins the cluster the way a
user's does: ``lvd`` in a subprocess with ``RAY_ADDRESS`` set (the test process never joins it:
pytest's ``ray_session`` is a local instance, and a process joins one cluster only).

- The curation stages (ingest … dataset) and a 2-worker training run go across both nodes: Ray's
  state API shows each per-image stage's Ray Data actors on both nodes, and one Ray Train worker
  per node (1 CPU per node; each stage asks for 2 one-CPU actors, each trainer worker for 0.75 CPU).
  Every curation output equals a reference run of the same config on a plain local Ray (shard
  checksums and rows in the manifests).
- The worker node's raylet is SIGKILLed while the `nsfw` stage runs (shards half written): the
  node is lost, a replacement worker node joins, and the stage finishes — in the same run (Ray
  restarts the lost actors and retries their tasks) or, if that run failed, in a rerun that
  resumes from the finished shards — with an output equal to the clean run's.
- A training worker process is SIGKILLed after the first checkpoint: Ray Train restarts the
  worker group (FailureConfig), the workers resume from the checkpoint, and the run ends at the
  last step with the same loss terms and schedule values at every step as the clean run.

Data: 30 real photos and synthetic images (tests/photos.py) in a local folder, tiny models
(``dinov2:vit_test:none`` embeddings; the tiny ViT recipe of tests/test_train_ray.py).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from photos import PHOTOS, generated, jpeg, photo, variants
from raycluster import RayCluster

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CURATION = ["ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup", "cluster", "retrieve", "dataset"]
RAY_DATA_STAGES = {"nsfw": "NsfwBatch", "face_blur": "FaceBlurBatch", "embed": "EmbedBatch"}  # actor pools
KILLED_STAGE = "nsfw"
STEPS = 10
LOSS_KEYS = ("total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy")
GUARD = 900  # seconds: a hung subprocess fails the test instead of blocking the suite (not a speed check)

CONFIG = """\
name: multinode
root: {root}
sources:
  uncurated: [{{name: web, images: {data}/uncurated}}]
  curated: [{{name: cur, images: {data}/curated}}]
engine: {{shard_rows: 3}}
ingest: {{decode_workers: 1}}
hash_dedup: {{radius: 12, batch_size: 3, concurrency: 2}}
nsfw: {{batch_size: 3, concurrency: 2}}
face_blur: {{batch_size: 3, concurrency: 2}}
embed: {{model: 'dinov2:vit_test:none', batch_size: 3, concurrency: 2, device: cpu}}
copy_dedup: {{k: 8, threshold: 0.98, eval_threshold: 0.95}}
cluster: {{n_clusters: 4}}
retrieve: {{min_hits: 0, per_cluster: 20}}
train:
  workers: 2
  cpus_per_worker: 0.75       # one trainer worker per 1-CPU node
  threads_per_worker: 1
  checkpoint_every: 2
  metrics_every: 1
  max_failures: 2
  data: {{num_cpus: 0.25}}
  ssl:
    student: {{arch: vit_test, patch_size: 14, drop_path_rate: 0.1, layerscale: null,
               backbone_kwargs: {{embed_dim: 32, depth: 2, num_heads: 2}}}}
    crops: {{global_crops_size: 28, local_crops_size: 14, local_crops_number: 2}}
    dino: {{head_n_prototypes: 64, head_hidden_dim: 64, head_bottleneck_dim: 32}}
    ibot: {{head_n_prototypes: 64}}
    train: {{batch_size_per_gpu: 4, official_epoch_length: 5, centering: centering}}
    optim: {{epochs: 2, warmup_epochs: 1, lr: 0.001}}
    compute: {{autocast_dtype: fp32}}
"""


# ---------------------------------------------------------------------------------------- helpers
def build_data(data: Path) -> None:
    """30 uncurated images (20 shipped photos, a near-duplicate, 9 synthetic) and 4 curated ones."""
    (data / "uncurated").mkdir(parents=True)
    (data / "curated").mkdir(parents=True)
    for name in sorted(PHOTOS):
        im = photo(name)
        im.thumbnail((96, 96))
        (data / "uncurated" / f"{name}.jpg").write_bytes(jpeg(im))
    small = photo("astronaut")
    small.thumbnail((96, 96))
    (data / "uncurated" / "astronaut-q30.jpg").write_bytes(variants(small)["q30"])
    for seed in range(9):
        (data / "uncurated" / f"synthetic-{seed}.jpg").write_bytes(generated(seed, (96, 72)))
    for seed in range(4):
        (data / "curated" / f"query-{seed}.jpg").write_bytes(generated(100 + seed, (96, 72)))


def manifests(cfg_path: Path, stages: list[str]) -> dict[str, dict]:
    """unit label → what must not depend on where a stage ran: fingerprint, rows, shard checksums."""
    from pipeline.config import load_config
    from pipeline.engine import Engine
    from pipeline.engine import store

    engine = Engine(load_config(cfg_path), show_progress=False)
    out = {}
    for name in stages:
        for unit in engine.units(name):
            m = store.read_manifest(unit.dir)
            assert m is not None, f"{unit.label} has no manifest in {unit.dir}"
            out[unit.label] = {"fingerprint": m["fingerprint"], "rows": m["rows"], "content": m["content"],
                               "shards": [(s["file"], s["rows"], s["sha256"]) for s in m["shards"]]}
    return out


def unit_dir(cfg_path: Path, stage: str, partition: str | None = None) -> Path:
    from pipeline.config import load_config
    from pipeline.engine import Engine

    units = Engine(load_config(cfg_path), show_progress=False).units(stage)
    return next(u.dir for u in units if partition is None or u.partition.name == partition)


def lvd(cluster: RayCluster, log: Path, *args: str) -> subprocess.Popen:
    """``lvd ARGS`` in a subprocess joined to the cluster (RAY_ADDRESS), output to ``log``."""
    with open(log, "a") as fh:
        fh.write(f"\n$ lvd {' '.join(args)}\n")
        fh.flush()
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=cluster.env(TQDM_DISABLE="1", PYTHONUNBUFFERED="1"), cwd=log.parent)


def finish(proc: subprocess.Popen, log: Path) -> int:
    try:
        return proc.wait(timeout=GUARD)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"`lvd` hung (> {GUARD}s); log:\n{log.read_text()[-8000:]}")


def run_ok(cluster: RayCluster, log: Path, *args: str) -> None:
    rc = finish(lvd(cluster, log, *args), log)
    assert rc == 0, f"lvd {' '.join(args)} failed ({rc}):\n{log.read_text()[-8000:]}"


def node_of_pid(cluster: RayCluster, pid: int) -> str:
    """Which of our nodes a process belongs to (its session is the node's)."""
    sid = os.getsid(pid)
    return next(n.name for n in cluster.iter_nodes() if n.sid == sid)


def train_metrics(work: Path) -> dict[int, dict]:
    from model.train.metrics import read_metrics

    return {r["step"]: r for r in read_metrics(work / "metrics.jsonl")}


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    build_data(base / "data")
    configs = {}
    for name in ("local", "cluster"):
        path = base / f"{name}.yaml"
        path.write_text(CONFIG.format(root=base / f"out-{name}", data=base / "data"))
        configs[name] = path
    return base, configs


@pytest.fixture(scope="module")
def reference(setup, ray_session):
    """The curation stages of the same config on the session's plain local Ray, in this process."""
    from pipeline.config import load_config
    from pipeline.engine import Engine

    _, configs = setup
    Engine(load_config(configs["local"]), show_progress=False).run(until="dataset")
    return manifests(configs["local"], CURATION)


@pytest.fixture(scope="module")
def cluster():
    with RayCluster(head_cpus=1, worker_cpus=[1], object_store_mb=100) as c:
        yield c


@pytest.fixture(scope="module")
def clean_run(setup, cluster):
    """`lvd run --until train` on the cluster; returns what the checks need (Ray state, manifests, metrics)."""
    base, configs = setup
    cfg = configs["cluster"]
    log = base / "lvd-cluster.log"
    run_ok(cluster, log, "run", "--config", str(cfg), "--until", "train")
    state = cluster.driver("state")
    work = unit_dir(cfg, "train") / "work"
    pids = {r: int((work / "workers" / f"rank-{r}.pid").read_text()) for r in (0, 1)}
    return {"state": state, "manifests": manifests(cfg, CURATION), "metrics": train_metrics(work),
            "train_state": _final_state(work), "worker_pids": pids}


def _final_state(work: Path) -> dict:
    from model.train.checkpoint import latest_checkpoint, read_state

    return read_state(latest_checkpoint(work / "checkpoints"))


# ---------------------------------------------------------------------------------------- tests
def test_cluster_has_two_nodes_and_drivers_attach_to_the_head(cluster):
    nodes = {n["resource"]: n for n in cluster.nodes() if n["alive"]}
    assert set(nodes) == {"rc_head", "rc_w1"}
    assert nodes["rc_head"]["is_head"] and not nodes["rc_w1"]["is_head"]
    assert nodes["rc_head"]["resources"]["CPU"] == nodes["rc_w1"]["resources"]["CPU"] == 1.0
    assert nodes["rc_head"]["node_id"] != nodes["rc_w1"]["node_id"]
    assert nodes["rc_head"]["driver_here"]  # so losing the worker node never takes a driver with it
    # separate processes: each node has its own raylet (and its own session of processes)
    assert cluster.head.raylet_pid() != cluster.workers[0].raylet_pid()


def test_curation_and_training_run_on_both_nodes(cluster, clean_run, reference):
    state = clean_run["state"]
    both = {cluster.head.node_id, cluster.workers[0].node_id}
    # each per-image stage's Ray Data actor pool has actors on both nodes, and they ran tasks there
    for stage, cls in RAY_DATA_STAGES.items():
        actors = [a for a in state["actors"] if cls in a["class_name"]]
        assert {a["node_id"] for a in actors} == both, (stage, actors)
        tasks = [t for t in state["tasks"] if t["type"] == "ACTOR_TASK" and cls in (t["name"] or "")
                 and t["state"] == "FINISHED"]
        assert {t["node_id"] for t in tasks} == both, (stage, [(t["name"], t["node_id"]) for t in tasks][:20])
    # training: one Ray Train worker per node; the ranks' processes are in the two nodes' sessions
    trainers = [a for a in state["actors"] if a["class_name"] == "RayTrainWorker"]
    assert {a["node_id"] for a in trainers} == both, trainers
    assert sorted(node_of_pid(cluster, p) for p in clean_run["worker_pids"].values()) == ["rc_head", "rc_w1"]
    metrics = clean_run["metrics"]
    assert sorted(metrics) == list(range(STEPS)) and clean_run["train_state"]["step"] == STEPS
    # the cluster computed exactly what a plain local Ray computes
    assert clean_run["manifests"] == reference


def test_lost_worker_node_during_a_ray_data_stage(setup, cluster, clean_run):
    base, configs = setup
    cfg = configs["cluster"]
    log = base / "lvd-lost-node.log"
    unit = unit_dir(cfg, KILLED_STAGE, "web")
    n_shards = len(clean_run["manifests"][f"{KILLED_STAGE}[web]"]["shards"])
    lost = cluster.workers[0]
    t0 = time.time()
    proc = lvd(cluster, log, "stage", KILLED_STAGE, "--config", str(cfg), "--force")
    killed, written = None, []
    while proc.poll() is None:
        written = [p for p in unit.glob("part-*.parquet") if p.stat().st_mtime >= t0]
        if written and not (unit / "_manifest.json").exists():
            killed = cluster.kill_raylet(lost)  # the node dies with shards half written
            break
        time.sleep(0.02)
    assert killed is not None, f"the stage finished before the node could be lost:\n{log.read_text()[-4000:]}"
    assert len(written) < n_shards
    replacement = cluster.add_worker(1)  # a new node joins (as an autoscaler would bring one)
    rc = finish(proc, log)
    reran = rc != 0
    if reran:  # the run failed with the node: a rerun resumes from the shards it had finished
        run_ok(cluster, log, "stage", KILLED_STAGE, "--config", str(cfg))
        assert "resuming" in log.read_text()
    print(f"\nraylet {killed} of {lost.name} killed after {len(written)}/{n_shards} shards; "
          f"{'finished by a resumed rerun' if reran else 'the same run finished'}; replacement {replacement.name}")
    after = manifests(cfg, CURATION)
    assert after[f"{KILLED_STAGE}[web]"] == clean_run["manifests"][f"{KILLED_STAGE}[web]"]
    assert after == clean_run["manifests"]


def test_killed_training_worker_resumes_from_the_checkpoint(setup, cluster, clean_run):
    from model.train.checkpoint import latest_checkpoint, read_state

    base, configs = setup
    cfg = configs["cluster"]
    log = base / "lvd-train-kill.log"
    work = unit_dir(cfg, "train") / "work"
    pid_file = work / "workers" / "rank-1.pid"
    t0 = time.time()
    proc = lvd(cluster, log, "train", "--config", str(cfg), "--force")
    killed = None
    while proc.poll() is None:
        ckpt = latest_checkpoint(work / "checkpoints") if (work / "checkpoints").is_dir() else None
        if ckpt is not None and pid_file.is_file() and pid_file.stat().st_mtime >= t0:
            killed = int(pid_file.read_text())
            killed_node = node_of_pid(cluster, killed)
            killed_after = read_state(ckpt)["step"]
            os.kill(killed, signal.SIGKILL)  # a training worker dies mid-run
            break
        time.sleep(0.05)
    rc = finish(proc, log)
    assert rc == 0, log.read_text()[-8000:]
    assert killed is not None and killed_after < STEPS, "the run finished before a worker could be killed"
    assert int(pid_file.read_text()) != killed, "Ray Train did not restart the worker group"
    print(f"\ntraining worker rank 1 (pid {killed}, node {killed_node}) killed after the step-{killed_after} checkpoint")
    a, b = clean_run["metrics"], train_metrics(work)
    assert sorted(b) == list(range(STEPS))
    for step in range(STEPS):
        for k in LOSS_KEYS:
            assert b[step][k] == a[step][k], (step, k, a[step][k], b[step][k])
    state = _final_state(work)
    assert state["step"] == STEPS
    assert state["schedule_values"] == clean_run["train_state"]["schedule_values"]
