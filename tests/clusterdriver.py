"""A small Ray driver for tests/raycluster.py: joins the cluster in ``RAY_ADDRESS`` and prints its answer as one JSON line.

    python tests/clusterdriver.py nodes    ray.nodes(): node id, alive, resources, the node's custom
                                           resource (rc_*), whether it is the head, and the node this
                                           driver attached to (Ray prefers the head on a shared host)
    python tests/clusterdriver.py state    Ray's state API (the head's dashboard): every task with its
                                           name, node id, job and state; every actor with its class,
                                           node id, pid and state; and the jobs
"""
from __future__ import annotations

import json
import os
import sys

MARK = "clusterdriver-json: "  # the answer's line (Ray may print to stdout too)


def _connect() -> None:
    import ray

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)


def nodes() -> list[dict]:
    import ray

    _connect()
    me = ray.get_runtime_context().get_node_id()
    out = []
    for n in ray.nodes():
        res = n.get("Resources") or {}
        names = [k for k in res if k.startswith("rc_")]
        out.append({"node_id": n["NodeID"], "alive": bool(n["Alive"]), "resources": res,
                    "resource": names[0] if names else None, "is_head": "node:__internal_head__" in res,
                    "driver_here": n["NodeID"] == me})
    return out


def state() -> dict:
    from ray.util.state import list_actors, list_jobs, list_tasks

    address = os.environ["RAY_API_SERVER_ADDRESS"]
    tasks = list_tasks(address=address, limit=10_000, detail=True, raise_on_missing_output=False, timeout=120)
    actors = list_actors(address=address, limit=10_000, detail=True, raise_on_missing_output=False, timeout=120)
    jobs = list_jobs(address=address, raise_on_missing_output=False, timeout=120)
    return {
        "tasks": [{"name": t.name, "node_id": t.node_id, "job_id": t.job_id, "state": t.state, "type": t.type,
                   "actor_id": t.actor_id, "attempt": t.attempt_number} for t in tasks],
        "actors": [{"class_name": a.class_name, "node_id": a.node_id, "pid": a.pid, "state": a.state,
                    "actor_id": a.actor_id, "job_id": a.job_id} for a in actors],
        "jobs": [{"job_id": j.job_id, "entrypoint": j.entrypoint, "status": str(j.status),
                  "driver_pid": (j.driver_info.pid if j.driver_info else None)} for j in jobs],
    }


if __name__ == "__main__":
    command = sys.argv[1]
    result = {"nodes": nodes, "state": state}[command]()
    print(MARK + json.dumps(result), flush=True)
