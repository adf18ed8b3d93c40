import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")


import pytest  # noqa: E402

# Under pytest-xdist (infra/test.sh runs LVD_TEST_WORKERS=2 workers) each group runs whole in one worker:
# a module (its module-scoped fixtures are built once), or the modules sharing an expensive session
# fixture. Groups are handed out longest first (durations measured on the 2-core machine), so the two
# workers end together; then in collection order. (xdist's own loadgroup cannot be used: with pytest 9
# its group suffix no longer reaches the node ids.)
SHARED_FIXTURE_MODULES = {
    "demo-run": ("test_dashboard_app", "test_dashboard_browser", "test_dashboard_data", "test_dashboard_index",
                 "test_dashboard_thumbs", "test_demoeval"),  # demo_run
    "tiny-teacher": ("test_local_train", "test_distill_ray"),  # trained_tiny_teacher
}
LONGEST_FIRST = ("test_demo_fresh", "test_kill_anywhere", "test_multinode", "tiny-teacher", "test_train_ray",
                 "demo-run", "test_pipeline_flow", "test_deployment", "test_cli", "test_filter_stages")
_GROUP_OF_MODULE = {m: g for g, modules in SHARED_FIXTURE_MODULES.items() for m in modules}


def xdist_group(nodeid: str) -> str:
    """The group a test runs in: its module's, or that of the session fixture its module shares."""
    module = Path(nodeid.split("::", 1)[0]).stem
    return _GROUP_OF_MODULE.get(module, module)


def pytest_xdist_make_scheduler(config, log):
    if config.getoption("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only an xdist worker's collection (what the scheduler hands out)
        return
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(xdist_group(it.nodeid), len(rank)))  # stable: collection order otherwise


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (stages reuse it via ensure_ray)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=500 * 1024 * 1024,
             runtime_env={"env_vars": {"PYTHONPATH": f"{ROOT / 'tests'}:{ROOT}"}})  # workers import test helpers
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


DEMO_RUN_YAML = """\
name: dashdemo
root: out
sources:
  uncurated: [{{name: web, urls: {urls}, warc: ['{warc}']}}]
  curated: [{{name: cur, images: {curated}}}]
  eval: [{{name: ev, images: {eval}}}]
engine: {{shard_rows: 32}}
ingest: {{allow_private_addresses: true}}
hash_dedup: {{radius: 12, concurrency: 1}}
nsfw: {{threshold: 0.08, concurrency: 1, batch_size: 32}}   # low: a few demo images are removed as NSFW
face_blur: {{concurrency: 1}}
embed: {{model: 'timm:efficientnet_lite0:package', batch_size: 32, concurrency: 1}}
copy_dedup: {{k: 16, threshold: 0.85, eval_threshold: 0.83}}   # as configs/demo.yaml (measured there)
cluster: {{n_clusters: 16}}
retrieve: {{method: sample, k: 4}}
"""


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory, ray_session):
    """The curation DAG (ingest … dataset) run once through the engine on the demo corpus served on
    loopback (as tests/test_pipeline_flow.py builds it), with an NSFW threshold low enough to remove a
    few images and the demo's packaged pretrained embedder (as configs/demo.yaml). Returns (config path, corpus)."""
    from pipeline.config import load_config
    from pipeline.democorpus import build_demo_corpus, serve_demo_corpus
    from pipeline.engine import Engine

    root = tmp_path_factory.mktemp("demo-run")
    with serve_demo_corpus(root / "corpus", port=0) as server:
        corpus = build_demo_corpus(root / "corpus", base_url=server.url)
        cfg = root / "demo.yaml"
        cfg.write_text(DEMO_RUN_YAML.format(urls=corpus.urls, warc=corpus.warc, curated=corpus.curated,
                                            eval=corpus.eval))
        Engine(load_config(cfg), show_progress=False).run(until="dataset")
    return cfg, corpus


@pytest.fixture(scope="session")
def trained_tiny_teacher(tmp_path_factory):
    """The tiny DINOv2 setting trained once (tests/tinyssl.py): local training and distillation tests share it."""
    from tinyssl import train_tiny_teacher

    return train_tiny_teacher(tmp_path_factory.mktemp("tiny-photos"))
