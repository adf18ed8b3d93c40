"""A real multi-node Ray cluster on this machine, for tests: a head and worker nodes as separate processes.

``RayCluster`` runs ``ray start --head`` and ``ray start --address=127.0.0.1:<port>`` (the venv's
``ray``), each node with its own ``--temp-dir`` (short: unix socket paths are limited to 107
bytes), CPUs, object store, free ports and a custom resource named after the node (``rc_head``,
``rc_w1``, …: it tells the nodes apart in ``ray.nodes()``, and a task can ask for it to be placed). Every node is started in a new session
(``start_new_session``): the node's daemons, and the workers its raylet forks, all carry that
session id, so a node is stopped by signalling exactly the processes of its session — never
``ray stop`` (it stops every Ray on the machine, other tests' and other people's included).

Joining processes (drivers, ``lvd``) get ``cluster.env()``: ``RAY_ADDRESS``, ``RAY_API_SERVER_ADDRESS``
(the head's dashboard, which serves Ray's state API), token authentication
(``RAY_AUTH_MODE=token`` with a token of this cluster in ``RAY_AUTH_TOKEN``: Ray 2.60 heads enable
token auth, and ``~/.ray`` is left alone), and fast node-death detection (GCS health checks every
second, so a killed raylet's node is marked dead in seconds, not ~30 s). The test process itself
is never connected to the cluster: a process can join one Ray cluster only, and pytest's
``ray_session`` may be connected to a local instance. Queries go through ``tests/clusterdriver.py``
in a subprocess.

Ray resolves ``--node-ip-address=127.0.0.1`` to the machine's address (``resolve_ip_for_localhost``),
so nodes register under that address; every connection in the tests still goes to 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

HERE = Path(__file__).resolve().parent
RAY = Path(sys.executable).parent / "ray"
DRIVER = HERE / "clusterdriver.py"
MARK = "clusterdriver-json: "  # as tests/clusterdriver.py prints its answer
HEALTH_CHECKS = {  # GCS → raylet health checks: a dead raylet's node is marked dead after ~5 s (default ~30 s)
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "5",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_pids(sid: int) -> list[int]:
    """Every live process of session ``sid`` (a node's daemons and the workers its raylet forked)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getsid(int(entry)) == sid:
                    out.append(int(entry))
            except OSError:  # gone meanwhile
                pass
    return sorted(out)


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Node:
    """One started node: its name (== its custom resource), temp dir, session id and CPUs."""

    name: str
    temp_dir: Path
    cpus: float
    sid: int = 0
    log: Path | None = None
    node_id: str | None = None  # Ray's node id, once seen in ray.nodes()
    lost: bool = False  # its raylet was killed: Ray is to mark it dead, and nobody waits for it

    @property
    def resource(self) -> str:
        return self.name

    def pids(self) -> list[int]:
        return [p for p in session_pids(self.sid) if not _is_zombie(p)] if self.sid else []

    def processes(self, title: str) -> list[int]:
        """This node's processes whose command line (a Ray worker's is its title, e.g.
        ``ray::MapWorker(MapBatches(NsfwBatch)).submit`` while it runs a task) contains ``title``."""
        return [pid for pid in self.pids() if title in " ".join(_cmdline(pid))]

    def raylet_pid(self) -> int:
        """The pid of this node's raylet (the one whose --temp_dir is this node's)."""
        for pid in self.pids():
            cmd = _cmdline(pid)
            if cmd and cmd[0].endswith("/raylet") and f"--temp_dir={self.temp_dir}" in cmd:
                return pid
        raise LookupError(f"no raylet of node {self.name} ({self.temp_dir}) is running")


class RayCluster:
    """Start with ``with RayCluster(head_cpus=2, worker_cpus=[2]) as cluster:``; see the module docstring."""

    def __init__(self, head_cpus: float = 1, worker_cpus: tuple[float, ...] | list[float] = (2,),
                 object_store_mb: int = 100, dashboard: bool = True, start_timeout: float = 300.0) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: socket paths live under it
        self.head_cpus, self.worker_cpus = head_cpus, list(worker_cpus)
        self.object_store_bytes = object_store_mb * 1024 * 1024
        self.dashboard = dashboard
        self.start_timeout = start_timeout
        self.token = secrets.token_hex(32)
        self.port = free_port()
        self.dashboard_port = free_port()
        self.head: Node | None = None
        self.workers: list[Node] = []
        self._all: list[Node] = []
        self._counter = 0

    # ------------------------------------------------------------------ addresses / env
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment of a process that joins this cluster (and of the nodes themselves)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(HEALTH_CHECKS, RAY_ADDRESS=self.address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token,
                   RAY_USAGE_STATS_ENABLED="0", RAY_API_SERVER_ADDRESS=self.dashboard_url,
                   PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
        env.update(extra)
        return env

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.head = self._start_node("rc_head", self.head_cpus, head=True)
        for cpus in self.worker_cpus:
            self.add_worker(cpus)

    def add_worker(self, cpus: float, wait: bool = True) -> Node:
        """Start one more worker node (``rc_w1``, ``rc_w2``, …) and wait until Ray shows it alive."""
        self._counter += 1
        node = self._start_node(f"rc_w{self._counter}", cpus, head=False)
        self.workers.append(node)
        if wait:
            self.wait_alive()
        return node

    def _start_node(self, name: str, cpus: float, head: bool) -> Node:
        node = Node(name, self.root / name.removeprefix("rc_"), cpus)
        node.temp_dir.mkdir(parents=True)
        node.log = self.root / f"{name}.start.log"
        cmd = [str(RAY), "start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
               f"--resources={json.dumps({name: 1})}", f"--object-store-memory={self.object_store_bytes}",
               f"--temp-dir={node.temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
               f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", "--disable-usage-stats", "--log-style=record"]
        if head:
            cmd += ["--head", f"--port={self.port}", f"--ray-client-server-port={free_port()}",
                    f"--include-dashboard={'true' if self.dashboard else 'false'}"]
            if self.dashboard:
                cmd += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        else:
            cmd += [f"--address={self.address}"]
        self._all.append(node)
        with open(node.log, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=self.root,
                                    start_new_session=True)
            node.sid = proc.pid  # the session leader's pid is the session id; the daemons keep it
            try:
                rc = proc.wait(timeout=self.start_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise RuntimeError(f"`ray start` of {name} did not return; log:\n{node.log.read_text()[-4000:]}")
        if rc != 0:
            raise RuntimeError(f"`ray start` of {name} failed ({rc}); log:\n{node.log.read_text()[-4000:]}")
        return node

    def wait_alive(self, timeout: float | None = None) -> list[dict]:
        """Poll ``ray.nodes()`` until every running node of ours is alive; records their node ids."""
        deadline = time.monotonic() + (timeout or self.start_timeout)
        running = [n for n in self._all if not n.lost and n.pids()]
        while True:
            nodes = self.nodes()
            alive = {n["resource"]: n for n in nodes if n["alive"] and n["resource"]}
            if all(n.name in alive for n in running):
                for n in running:
                    n.node_id = alive[n.name]["node_id"]
                return nodes
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not all alive after the timeout: {nodes}")
            time.sleep(0.5)

    def driver(self, *args: str, timeout: float = 300.0) -> Any:
        """Run ``tests/clusterdriver.py ARGS`` connected to this cluster; returns its JSON output."""
        proc = subprocess.run([sys.executable, str(DRIVER), *args], check=False, env=self.env(), capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)
        if proc.returncode != 0:
            raise RuntimeError(f"clusterdriver {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
        answers = [line[len(MARK):] for line in proc.stdout.splitlines() if line.startswith(MARK)]
        if len(answers) != 1:
            raise RuntimeError(f"clusterdriver {' '.join(args)} gave no answer; stdout:\n{proc.stdout[-6000:]}")
        return json.loads(answers[0])

    def nodes(self) -> list[dict]:
        """``ray.nodes()`` (node_id, alive, resources, our resource name, is_head), via a driver."""
        return self.driver("nodes")

    def kill_raylet(self, node: Node) -> int:
        """SIGKILL the raylet of ``node``: the node is lost (its workers exit when they see the raylet
        gone; what else is left of its session is stopped with the cluster). Returns the raylet's pid."""
        pid = node.raylet_pid()
        os.kill(pid, signal.SIGKILL)
        node.lost = True
        return pid

    def stop_node(self, node: Node, grace: float = 3.0) -> None:
        """Every process of the node's session: SIGTERM, then SIGKILL what is left after ``grace`` s."""
        if not node.sid:
            return
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
            pids = node.pids()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while node.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not node.pids():
                return

    def stop(self) -> None:
        """Stop every node this cluster started (workers first) and remove its temp dir."""
        for node in reversed(self._all):
            self.stop_node(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def iter_nodes(self) -> Iterator[Node]:
        yield from self._all
