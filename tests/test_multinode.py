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
- The worker node's raylet is SIGKILLed while its `nsfw` actor maps a batch and the stage's shards
  are half written: Ray marks the node dead, and the stage finishes on the head alone in the same
  run (Ray Data restarts the lost actor there once the head's actor is done and retries its batch)
  — or, should that run fail, a rerun on a replacement node resumes from the finished shards —
  with an output equal to the clean run's and to the local reference.
- A replacement worker node joins; a training worker process is SIGKILLed after the first
  checkpoint: Ray Train restarts the worker group (FailureConfig) across both nodes, rank 0 logs
  resuming from that checkpoint, and the run ends at the last step with the same loss terms and
  schedule values at every step as the clean run.

Data: 30 real photos and synthetic images (tests/photos.py) in a local folder, tiny models
(random-init ``timm:mobilenetv3_small_050`` embeddings: fast, and unlike a random ViT they tell images
apart; the tiny ViT recipe of tests/test_train_ray.py).
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from photos import PHOTOS, generated, jpeg, photo, variants
from raycluster import RayCluster

pytestmark = pytest.mark.integration

CURATION = ["ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup", "cluster", "retrieve", "dataset"]
RAY_DATA_STAGES = {"nsfw": "NsfwBatch", "face_blur": "FaceBlurBatch", "embed": "EmbedBatch"}  # actor pools
KILLED_STAGE = "nsfw"
STEPS = 6  # 2 "epochs" of 3 iterations; checkpoints at steps 2, 4 and 6
LOSS_KEYS = ("total", "dino", "ibot", "koleo", "lr", "wd", "momentum", "teacher_temp", "teacher_entropy")
# Ray Data starts an actor pool's work once all its actors are up (by default the first actor up takes
# every shard of a small stage, and the other node's actor, still importing its model, gets none).
LVD_ENV = {"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "600", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
GUARD = 540  # seconds: a hung `lvd` fails the test instead of blocking the suite (not a speed check)
_STARTED: list[subprocess.Popen] = []  # `lvd` processes: any still running when the module ends is killed

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
embed: {{model: 'timm:mobilenetv3_small_050:none', batch_size: 3, concurrency: 2, device: cpu}}
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
    train: {{batch_size_per_gpu: 4, official_epoch_length: 3, centering: centering}}
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
    from pipeline.engine import Engine, store

    engine = Engine(load_config(cfg_path), show_progress=False)
    out = {}
    for name in stages:
        for unit in engine.units(name):
            m = store.read_manifest(unit.dir)
            assert m is not None, f"{unit.label} has no manifest in {unit.dir}"
            out[unit.label] = {"fingerprint": m["fingerprint"], "rows": m["rows"], "content": m["content"],
                               "shards": [(s["file"], s["rows"], s["sha256"]) for s in m["shards"]]}
    return out


def states(cfg_path: Path, stages: list[str]) -> dict[str, str]:
    from pipeline.config import load_config
    from pipeline.engine import Engine

    engine = Engine(load_config(cfg_path), show_progress=False)
    return {name: engine.status(name).state for name in stages}


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
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                                env=cluster.env(**LVD_ENV), cwd=log.parent)
    _STARTED.append(proc)
    return proc


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


def new_files(folder: Path, pattern: str, since: float) -> list[Path]:
    """Files of ``folder`` matching ``pattern`` written at or after ``since`` (a time.time())."""
    out = []
    for p in folder.glob(pattern):
        try:
            if p.stat().st_mtime >= since:
                out.append(p)
        except FileNotFoundError:  # removed meanwhile (--force clears the old shards)
            pass
    return out


def node_of_pid(cluster: RayCluster, pid: int) -> str:
    """Which of our nodes a process belongs to (its session is the node's)."""
    sid = os.getsid(pid)
    return next(n.name for n in cluster.iter_nodes() if n.sid == sid)


def alive_nodes(cluster: RayCluster, until=lambda names: True) -> set[str]:
    """Our alive nodes per ``ray.nodes()``, once ``until(names)`` holds (Ray marks a lost node dead
    after a few failed health checks)."""
    deadline = time.monotonic() + GUARD
    while True:
        names = {n["resource"] for n in cluster.nodes() if n["alive"]}
        if until(names) or time.monotonic() > deadline:
            return names
        time.sleep(0.5)


def replace_lost_workers(cluster: RayCluster) -> None:
    """Start a new worker node for each one that is gone, so the cluster has a head and a worker again."""
    alive = {n["resource"] for n in cluster.nodes() if n["alive"]}
    for _ in range(1 - len(alive - {"rc_head"})):
        cluster.add_worker(1)


def resumed_from(cluster: RayCluster, checkpoints: Path) -> list[int]:
    """Steps of ``checkpoints`` that a training worker logged resuming from (in the nodes' Ray worker logs)."""
    pattern = re.compile(rf"resuming from {re.escape(str(checkpoints))}/\S+ \(step (\d+)\)")
    steps = []
    for path in cluster.root.glob("*/session_2*/logs/worker-*.err"):
        steps += [int(m.group(1)) for m in pattern.finditer(path.read_text(errors="replace"))]
    return sorted(steps)


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
    """The killed stage (and its upstream) of the same config on the session's plain local Ray, in this process."""
    from pipeline.config import load_config
    from pipeline.engine import Engine

    _, configs = setup
    Engine(load_config(configs["local"]), show_progress=False).ensure(KILLED_STAGE)
    return manifests(configs["local"], ["ingest", KILLED_STAGE])


@pytest.fixture(scope="module")
def cluster():
    with RayCluster(head_cpus=1, worker_cpus=[1], object_store_mb=100) as c:
        try:
            yield c
        finally:
            for proc in _STARTED:  # a failed test may leave its `lvd` running: stop it before the cluster
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


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
    names = {cluster.head.node_id: "rc_head", cluster.workers[0].node_id: "rc_w1"}

    def nodes_of(tasks: list[dict]) -> list[str]:
        return sorted({names.get(t["node_id"], str(t["node_id"])) for t in tasks})

    finished = [t for t in state["tasks"] if t["state"] == "FINISHED"]
    placement = {}
    # hash_dedup's thumbnail tasks, and each per-image stage's Ray Data actors and the batches they mapped
    placement["hash_dedup"] = nodes_of([t for t in finished if t["name"] == "MapBatches(thumbnails_batch)"])
    for stage, cls in RAY_DATA_STAGES.items():
        placement[stage] = nodes_of([t for t in finished if t["name"] == f"MapWorker(MapBatches({cls})).submit"])
        placement[f"{stage} actors"] = nodes_of([a for a in state["actors"] if a["class_name"] == f"MapWorker(MapBatches({cls}))"
                                                 and a["node_id"]])
    placement["read tasks"] = nodes_of([t for t in finished if t["name"] == "MapBatches(_read_shard)"])
    # training: one Ray Train worker per node; they are the processes that wrote ranks 0 and 1's pid files
    trainers = [a for a in state["actors"] if a["class_name"] == "RayTrainWorker"]
    placement["RayTrainWorker"] = nodes_of(trainers)
    placement["ranks 0, 1"] = nodes_of([a for a in trainers if int(a["pid"]) in clean_run["worker_pids"].values()])
    print(f"\nnode ids: rc_head={cluster.head.node_id[:12]}, rc_w1={cluster.workers[0].node_id[:12]}; placement: {placement}")
    assert placement == {k: ["rc_head", "rc_w1"] for k in placement}

    metrics = clean_run["metrics"]
    assert sorted(metrics) == list(range(STEPS)) and clean_run["train_state"]["step"] == STEPS
    # the cluster computed exactly what a plain local Ray computes
    assert {k: clean_run["manifests"][k] for k in reference} == reference


def test_lost_worker_node_during_a_ray_data_stage(setup, cluster, clean_run, reference):
    """SIGKILL the worker node's raylet while its actor maps a batch of `nsfw` and shards are half written."""
    base, configs = setup
    cfg = configs["cluster"]
    log = base / "lvd-lost-node.log"
    unit = unit_dir(cfg, KILLED_STAGE, "web")
    label = f"{KILLED_STAGE}[web]"
    n_shards = len(reference[label]["shards"])
    lost = cluster.workers[0]
    busy_title = f"MapBatches({RAY_DATA_STAGES[KILLED_STAGE]})).submit"
    t0 = time.time()
    proc = lvd(cluster, log, "stage", KILLED_STAGE, "--config", str(cfg), "--force")
    killed, written = None, []
    while proc.poll() is None:
        written = new_files(unit, "part-*.parquet", t0)
        if written and not (unit / "_manifest.json").exists() and lost.processes(busy_title):
            killed = cluster.kill_raylet(lost)  # the node dies mid-batch, with shards half written
            break
        time.sleep(0.05)
    assert killed is not None, f"the stage finished before the node could be lost:\n{log.read_text()[-4000:]}"
    assert len(written) < n_shards
    rc = finish(proc, log)  # the head alone is left
    alive = alive_nodes(cluster, until=lambda names: lost.name not in names)
    if rc != 0:  # the run failed with the node: with a replacement node, a rerun resumes from the finished shards
        replace_lost_workers(cluster)
        run_ok(cluster, log, "stage", KILLED_STAGE, "--config", str(cfg))
        assert "resuming" in log.read_text()
    print(f"\nraylet {killed} of rc_w1 killed with {len(written)}/{n_shards} shards written; "
          f"{'a resumed rerun' if rc else 'the same run'} finished the stage; alive now: {sorted(alive)}")
    assert alive == {"rc_head"}  # the lost node is gone (and the head alone finished the stage, or a rerun did)
    after = manifests(cfg, CURATION)
    assert after[label] == clean_run["manifests"][label] == reference[label]
    # same content: every downstream stage computed from the first nsfw output is still valid (done)
    assert after == clean_run["manifests"] and states(cfg, CURATION) == {name: "done" for name in CURATION}
    replace_lost_workers(cluster)  # a replacement node (as an autoscaler would bring one) for the training test


def test_killed_training_worker_resumes_from_the_checkpoint(setup, cluster, clean_run):
    from model.train.checkpoint import latest_checkpoint, read_state

    base, configs = setup
    cfg = configs["cluster"]
    log = base / "lvd-train-kill.log"
    replace_lost_workers(cluster)
    worker = next(n.name for n in reversed(cluster.workers) if not n.lost)  # the head's peer now
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
    # the restarted workers loaded the checkpoint (rank 0 says so in its Ray worker log on its node)
    resumed = resumed_from(cluster, work / "checkpoints")
    print(f"\ntraining worker rank 1 (pid {killed}, node {killed_node}) killed after the step-{killed_after} checkpoint; "
          f"the restarted worker group resumed from step(s) {resumed}")
    assert len(resumed) == 1 and killed_after <= resumed[0] < STEPS, resumed
    # both worker groups of this run (the killed one and its restart) had one worker on each node
    state = cluster.driver("state")
    jobs = [j["job_id"] for j in state["jobs"] if "pipeline.cli train --config" in j["entrypoint"]]
    names = {n.node_id: n.name for n in cluster.iter_nodes()}
    trainers = sorted(names.get(a["node_id"], str(a["node_id"])) for a in state["actors"]
                      if a["class_name"] == "RayTrainWorker" and a["job_id"] in jobs)
    print(f"RayTrainWorker actors of the run (both attempts): {trainers}")
    assert len(jobs) == 1 and trainers == sorted(["rc_head", worker] * 2), (jobs, trainers)
    a, b = clean_run["metrics"], train_metrics(work)
    assert sorted(b) == list(range(STEPS))
    for step in range(STEPS):
        for k in LOSS_KEYS:
            assert b[step][k] == a[step][k], (step, k, a[step][k], b[step][k])
    state = _final_state(work)
    assert state["step"] == STEPS
    assert state["schedule_values"] == clean_run["train_state"]["schedule_values"]
