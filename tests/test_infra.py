"""Cluster infrastructure: the Dockerfile installs exactly what infra/setup.sh installs, the KubeRay
manifests are well-formed (Kubernetes' own JSON schemas for every core object and pod template when
kubernetes-validate is installed, a structural check of the ray.io/v1 resources always), the
`ray up` YAML passes Ray's own config preparation and schema, and prefect.yaml loads with Prefect's
`prefect deploy` loader and points at the real flow, config, Ray head and Prefect server."""
from __future__ import annotations

import copy
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
KUBERNETES_VERSION = "1.33.0"  # schemas of a current Kubernetes release (kubernetes-validate ships them)


def pins() -> dict[str, str]:
    out = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            out[name.strip().lower()] = version.strip()
    return out


# --------------------------------------------------------------------------- Dockerfile


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of infra/Dockerfile: comments dropped, continuation lines joined."""
    instructions, current = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip()[:-1] + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            instructions.append((word.upper(), rest.strip()))
            current = ""
    return instructions


def pip_installs(script: str) -> list[list[str]]:
    """Every `python -m pip install ...` command of a shell text, as argument lists after `install`."""
    out = []
    for cmd in re.split(r"&&|;|\n", script):
        if not re.search(r"\bpip install\b", cmd):
            continue
        words = shlex.split(cmd.strip())
        if "pip" in words and "install" in words[words.index("pip"):]:
            out.append(words[words.index("install", words.index("pip")) + 1:])
    return out


def install_spec(args: list[str]) -> tuple[set[str], str, str, set[str]]:
    """(flags, constraints file, editable target, extras) of `pip install -q -c FILE -e '.[x,y]'`."""
    flags, constraints, target = set(), "", ""
    it = iter(args)
    for a in it:
        if a == "-c":
            constraints = next(it)
        elif a == "-e":
            target = next(it)
        elif a.startswith("-"):
            flags.add(a)
    m = re.fullmatch(r"(\.)\[([a-z0-9_,-]+)\]", target)
    assert m, f"unexpected install target {target!r}"
    return flags, constraints, m.group(1), set(m.group(2).split(","))


def setup_install() -> tuple[set[str], str, str, set[str]]:
    installs = [a for a in pip_installs((INFRA / "setup.sh").read_text()) if "-e" in a]
    assert len(installs) == 1, installs
    return install_spec(installs[0])


def test_tests_and_image_install_through_setup_sh():
    """infra/test.sh (what CI runs) installs with infra/setup.sh; the image runs the same script."""
    assert "bash infra/setup.sh" in (INFRA / "test.sh").read_text()
    runs = [rest for word, rest in dockerfile() if word == "RUN"]
    setup_runs = [r for r in runs if "bash infra/setup.sh" in r]
    assert len(setup_runs) == 1
    assert "PYTHON=python3.11" in setup_runs[0]


def test_dockerfile_copies_what_setup_sh_reads_before_running_it():
    text = (INFRA / "setup.sh").read_text()
    read = set(re.findall(r"\b([\w.-]+\.(?:toml|txt))\b", text))
    assert read == {"pyproject.toml", "constraints.txt"}
    copied: set[str] = set()
    for word, rest in dockerfile():
        if word == "COPY":
            copied |= set(rest.split()[:-1])
        if word == "RUN" and "bash infra/setup.sh" in rest:
            break
    assert read | {"infra/setup.sh", PYPROJECT["project"]["readme"]} <= copied
    assert "." not in copied  # the code comes after the dependency layer


def test_cuda_variant_is_setup_sh_install_plus_gpu_extra():
    flags, constraints, target, extras = setup_install()
    assert constraints == "constraints.txt"
    instr = dockerfile()
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in instr if word == "ARG" and "=" in rest}
    assert args["VARIANT"] == "cpu"
    assert re.fullmatch(r"python:3\.11[-\w.]*", args["PYTHON_IMAGE"])
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12"
    run = next(rest for word, rest in instr if word == "RUN" and "bash infra/setup.sh" in rest)
    cuda = run[run.index('if [ "$VARIANT" = cuda ]'):]
    editable = [a for a in pip_installs(cuda) if "-e" in a]
    assert len(editable) == 1
    c_flags, c_constraints, c_target, c_extras = install_spec(editable[0])
    assert (c_flags, c_constraints, c_target) == (flags, constraints, target)
    assert c_extras == extras | {"gpu"}
    assert "gpu" in PYPROJECT["project"]["optional-dependencies"]
    gpu_pkgs = {re.split(r"[<>=\[ ]", d)[0] for d in PYPROJECT["project"]["optional-dependencies"]["gpu"]}
    reinstalled = [a for a in pip_installs(cuda) if "--force-reinstall" in a]
    assert reinstalled and set(reinstalled[0]) - {"-q", "--no-deps", "--force-reinstall"} <= gpu_pkgs


def test_dockerfile_workdir_path_and_ignore():
    instr = dockerfile()
    assert ("WORKDIR", "/opt/lvd") in instr
    env = " ".join(rest for word, rest in instr if word == "ENV")
    assert "PATH=/opt/lvd/.venv/bin:$PATH" in env
    ignored = {ln.strip() for ln in (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    assert {".venv", "runs", "benchmarks/out", ".git"} <= ignored


# --------------------------------------------------------------------------- KubeRay and Kubernetes


def k8s_docs() -> dict[tuple[str, str], dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def raycluster() -> dict:
    return k8s_docs()[("RayCluster", "lvd")]


def groups(spec: dict) -> list[tuple[str, dict]]:
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec["workerGroupSpecs"]]


def image_tag(variant: str) -> str:
    return f"registry.example.com/lvd-curate:{VERSION}-{variant}"


def test_raycluster_structure():
    rc = raycluster()
    assert rc["apiVersion"] == "ray.io/v1"
    spec = rc["spec"]
    assert spec["rayVersion"] == pins()["ray"]
    assert {name for name, _ in groups(spec)} == {"head", "cpu", "gpu"}
    for name, g in groups(spec):
        assert all(isinstance(v, str) for v in g["rayStartParams"].values()), f"{name}: rayStartParams are strings"
        pod = g["template"]["spec"]
        container = pod["containers"][0]
        res = container["resources"]
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        assert container["image"] == image_tag("cuda" if gpus else "cpu"), name
        assert (gpus > 0) == (name == "gpu")
        assert container["workingDir"] == "/opt/lvd"
        assert res["requests"] == res["limits"], f"{name}: Ray sizes itself from the limits"
        volumes = {v["name"] for v in pod["volumes"]}
        assert {m["name"] for m in container["volumeMounts"]} <= volumes
        assert {"mountPath": "/data", "name": "lvd-data"} in container["volumeMounts"]
        claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        assert claims <= {name for kind, name in k8s_docs() if kind == "PersistentVolumeClaim"}
        if name != "head":
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert k8s_docs()[("PersistentVolumeClaim", "lvd-data")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_runs_the_dag_on_the_same_cluster_spec():
    from pipeline.config import load_config

    job = k8s_docs()[("RayJob", "lvd-curate")]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["rayClusterSpec"] == raycluster()["spec"]
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[:2] == ["lvd", "run"] and words[2] == "--config"
    assert words[3].startswith("/opt/lvd/")
    assert load_config(REPO / words[3].removeprefix("/opt/lvd/")).name == "lvd142m"
    assert job["spec"]["shutdownAfterJobFinishes"] is True


def pod_templates() -> list[tuple[str, dict]]:
    out = []
    for (kind, name), doc in k8s_docs().items():
        if kind == "RayCluster":
            out += [(f"{name}/{g}", spec["template"]) for g, spec in groups(doc["spec"])]
        elif kind == "RayJob":
            out += [(f"{name}/{g}", spec["template"]) for g, spec in groups(doc["spec"]["rayClusterSpec"])]
    return out


def test_core_objects_and_pod_templates_match_kubernetes_schemas():
    import kubernetes_validate as kv  # a test dependency: it ships Kubernetes' JSON schemas
    core = {k: d for k, d in k8s_docs().items() if not d["apiVersion"].startswith("ray.io/")}
    assert {kind for kind, _ in core} == {"Namespace", "PersistentVolumeClaim", "Secret", "Service", "StatefulSet",
                                          "Deployment"}
    for (kind, name), doc in core.items():
        kv.validate(doc, KUBERNETES_VERSION, strict=True)
    for name, template in pod_templates():  # each pod template of the Ray groups, as a core PodTemplate
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name.replace("/", "-")},
                     "template": template}, KUBERNETES_VERSION, strict=True)
    bad = copy.deepcopy(pod_templates()[0][1])
    bad["spec"]["containers"][0]["resources"]["limts"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "bad"}, "template": bad},
                    KUBERNETES_VERSION, strict=True)


def test_prefect_worker_and_server_wiring():
    docs = k8s_docs()
    server = docs[("Deployment", "prefect-server")]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    assert "asyncpg" in pins()  # the image has the Postgres driver Prefect needs
    assert "prefect-postgres.lvd.svc" in env["PREFECT_API_DATABASE_CONNECTION_URL"]
    worker = docs[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert worker["command"][:3] == ["prefect", "worker", "start"]
    assert worker["image"] == image_tag("cpu")


# --------------------------------------------------------------------------- ray up


def test_ray_up_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((INFRA / "ray-cluster.yaml").read_text())
    cfg = prepare_config(copy.deepcopy(raw))
    validate_config(cfg)
    nodes = cfg["available_node_types"]
    assert set(nodes) == {"head", "cpu", "gpu"} and cfg["head_node_type"] == "head"
    assert cfg["docker"]["image"] == image_tag("cpu")
    assert nodes["gpu"]["docker"]["worker_image"] == image_tag("cuda")
    assert raw["setup_commands"] == [] and raw["worker_setup_commands"] == []  # the image is the install
    assert nodes["head"]["resources"] == {"CPU": 0}
    broken = copy.deepcopy(raw)
    broken["available_node_types"]["cpu"]["min_wokers"] = 1
    with pytest.raises(Exception, match="min_wokers"):
        validate_config(prepare_config(broken))


# --------------------------------------------------------------------------- prefect.yaml


def load_prefect_yaml() -> tuple[list[dict], dict, str]:
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    console = Console(record=True, width=200)
    deployments, actions = _load_deploy_configs_and_actions(REPO / "prefect.yaml", console=console)
    return deployments, actions, console.export_text()


def test_prefect_yaml_loads_with_prefects_loader():
    from prefect.cli.deploy._models import PrefectYamlModel

    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    PrefectYamlModel.model_validate(raw)  # raises on a malformed file (the CLI only prints and skips)
    deployments, actions, printed = load_prefect_yaml()
    assert printed == ""  # the CLI reports skipped or invalid sections here
    assert [d["name"] for d in deployments] == ["lvd142m"]
    assert actions["pull"] == [{"prefect.deployments.steps.set_working_directory": {"directory": "/opt/lvd"}}]


def test_prefect_deployment_targets_the_flow_config_ray_head_and_server():
    from prefect.flows import load_flow_from_entrypoint

    from pipeline.config import load_config

    (dep,), _, _ = load_prefect_yaml()
    flow = load_flow_from_entrypoint(str(REPO / dep["entrypoint"]))
    assert flow.name == "curate-and-train"
    cfg = load_config(REPO / dep["parameters"]["config"])
    assert cfg.name == dep["name"]  # the deployment is curate-and-train/<config name>, as `lvd serve` names it
    env = dep["work_pool"]["job_variables"]["env"]
    rc = raycluster()["metadata"]
    assert env["RAY_ADDRESS"] == f"{rc['name']}-head-svc.{rc['namespace']}.svc.cluster.local:6379"
    service = k8s_docs()[("Service", "prefect-server")]
    port = service["spec"]["ports"][0]["port"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server.{service['metadata']['namespace']}.svc.cluster.local:{port}/api"
    worker = k8s_docs()[("Deployment", "prefect-worker")]["spec"]["template"]["spec"]["containers"][0]
    assert dep["work_pool"]["name"] == worker["command"][worker["command"].index("--pool") + 1]
    worker_env = {e["name"]: e["value"] for e in worker["env"]}
    assert worker_env["PREFECT_API_URL"] == env["PREFECT_API_URL"] and worker_env["RAY_ADDRESS"] == env["RAY_ADDRESS"]


def test_local_default_stays_sqlite():
    """Only prefect.yaml and the cluster manifests name a remote server; the local scripts do not."""
    for script in ("serve.sh", "lib.sh", "demo.sh"):
        text = (INFRA / script).read_text()
        assert "DATABASE_CONNECTION_URL" not in text and "prefect.yaml" not in text
    assert "http://127.0.0.1:$PREFECT_PORT/api" in (INFRA / "lib.sh").read_text()
