"""`lvd plan`: FLOP and memory models checked against torch's and FAISS's own counts, the estimate's
arithmetic, the recorded benchmark figures it reads, and the command."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline import plan
from pipeline.cli import main
from pipeline.config import load_config, parse_config

REPO = Path(__file__).resolve().parent.parent
LVD142M = REPO / "configs" / "lvd142m.yaml"


def test_vit_flops_equal_torch_flop_counter_on_our_vit():
    """The formula counts exactly what torch's FlopCounterMode counts (math SDPA: attention as bmm)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from model.layers.vit import vit_test

    model = vit_test(patch_size=14, img_size=112).eval()
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 112, 112))
    arch = plan.VitArch(image_size=112, patch_size=14, width=model.embed_dim, layers=len(model.blocks),
                        mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim)
    assert plan.vit_flops(arch) == counter.get_total_flops()


@pytest.mark.parametrize("arch, published_gmacs", [("ViT-H-14", 167.4), ("ViT-B-32", 4.41)])
def test_open_clip_architectures_match_published_compute(arch, published_gmacs):
    """Dims read from open_clip's model configs give the published multiply-adds of the same ViTs
    (timm's vit_huge_patch14_224 / vit_base_patch32_224 model cards; open_clip adds a small projection)."""
    flops = plan.embedding_flops(f"open_clip:{arch}:none")
    assert flops / 2 / 1e9 == pytest.approx(published_gmacs, rel=0.01)
    assert plan.model_arch(f"open_clip:{arch}:none").embed_dim == {"ViT-H-14": 1024, "ViT-B-32": 512}[arch]


@pytest.mark.parametrize("kind", ["flat", "ivf", "ivfpq"])
def test_index_bytes_match_a_real_faiss_index(kind):
    import faiss

    from pipeline.vectors.index import add_rows, empty_index

    faiss.omp_set_num_threads(1)  # small index: threads only contend with other processes
    n, d, nlist, pq_m = 10_000, 32, 16, 8
    x = np.random.default_rng(0).standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = empty_index(d, kind, nlist, pq_m, seed=0)
    if kind != "flat":  # the index's size does not depend on how well it is trained
        index.cp.niter = 2
        if kind == "ivfpq":
            index.pq.cp.niter = 2
    index.train(x)
    add_rows(index, x)
    real = len(faiss.serialize_index(index))
    assert plan.index_bytes(kind, n, d, nlist, pq_m) == pytest.approx(real, rel=0.05)


def test_search_and_kmeans_flops():
    assert plan.search_flops("flat", 1000, 10, 64, 1, 1, 8) == 2 * 10 * 1000 * 64
    # IVF: coarse assignment to every list + nprobe lists of n/nlist vectors each
    assert plan.search_flops("ivf", 1000, 10, 64, 10, 2, 8) == 10 * (2 * 10 * 64 + 2 * 2 * 100 * 64)
    assert plan.kmeans_flops(1000, 10, 8, 5) == 2 * 1000 * 10 * 8 * 5 + 2 * 1000 * 10 * 8  # all rows train
    assert plan.kmeans_flops(10**9, 10, 8, 5) == 2 * 2560 * 10 * 8 * 5 + 2 * 10**9 * 10 * 8  # FAISS samples k·256


RESULTS = {
    "ingest": {"figures": {"core_s_per_image": 0.005, "stored_kib_per_image": 10.0, "max_side": 256}},
    "filters": {"figures": {s: {"core_s_per_image": c} for s, c in
                            (("hash_dedup", 0.004), ("nsfw", 0.04), ("face_blur", 0.1))}},
    "embed": {"figures": {"flops_per_core_s": 1e11}},
    "vectors": {"figures": {s: {"flops_per_core_s": 5e9} for s in ("copy_dedup", "cluster", "retrieve")}},
}


def _cfg(tmp_path: Path, **sections) -> "plan.Config":
    return parse_config({"root": "run", **sections}, tmp_path)


def test_estimate_arithmetic(tmp_path):
    cfg = _cfg(tmp_path, embed={"model": "open_clip:ViT-B-32:none"}, ingest={"max_side": 512})
    hw = plan.Hardware(cpus=100, gpus=8, gpu="a100", driver_cpus=4, driver_gpus=0, driver_memory_gib=1000)
    p = plan.estimate(cfg, plan.Corpus(1e6, 1e4, 1e3), hw, RESULTS)
    st = {s.stage: s for s in p.stages}
    assert [s.stage for s in p.stages] == list(plan.PLAN_STAGES)
    assert st["nsfw"].cpu_hours == pytest.approx(1e6 * 0.04 / 3600)
    assert st["nsfw"].wall_hours == pytest.approx(st["nsfw"].cpu_hours / 100)
    per_image = plan.embedding_flops("open_clip:ViT-B-32:none")
    assert st["embed"].flops == pytest.approx((1e6 + 1e4 + 1e3) * per_image)
    assert st["embed"].gpu_hours == pytest.approx(st["embed"].flops / (312e12 * plan.MFU) / 3600)
    assert st["embed"].wall_hours == pytest.approx(st["embed"].gpu_hours / 8)
    assert st["ingest"].bytes_out == pytest.approx((1e6 + 1e4 + 1e3) * 10.0 * 4 * 1024)  # 256 -> 512 px: x4 pixels
    kept = 1e6 * plan.COPY_KEEP * plan.EVAL_KEEP
    assert st["cluster"].images == pytest.approx(kept)
    assert st["cluster"].cpu_hours == pytest.approx(plan.kmeans_flops(kept, 100_000, 512, 20) / 5e9 / 3600)
    assert st["cluster"].wall_hours == pytest.approx(st["cluster"].cpu_hours / 4)  # the driver's CPUs only
    assert p.bottleneck == max((s for s in p.stages if s.wall_hours), key=lambda s: s.wall_hours).stage
    assert not any("no measured figure" in w for w in p.warnings)


def test_estimate_flags_driver_memory_and_names_missing_benchmarks(tmp_path):
    cfg = _cfg(tmp_path)
    p = plan.estimate(cfg, plan.Corpus(1e9, 1e6, 0), plan.Hardware(driver_memory_gib=256), results={})
    assert any(w.startswith("copy_dedup: needs") for w in p.warnings)  # 1B float32 ViT-H vectors in one process
    assert "no measured figure for nsfw: run `.venv/bin/python benchmarks/filters.py`" in " ".join(p.warnings)
    assert "benchmarks/vectors.py" in " ".join(p.warnings)
    assert {s.stage: s.cpu_hours for s in p.stages}["nsfw"] is None


def test_recorded_results_cover_what_plan_reads(tmp_path):
    """The committed benchmarks/results/*.json hold every figure plan needs."""
    cfg = load_config(LVD142M)
    p = plan.estimate(cfg, plan.Corpus(1.2e9, 19e6, 1e5))
    assert not [w for w in p.warnings if "no measured figure" in w]
    assert all(s.wall_hours is not None for s in p.stages if s.stage != "dataset")
    assert {"ingest", "filters", "embed", "vectors"} <= set(p.measured)


def test_growth_figures_become_notes(tmp_path):
    row = {"growth_sizes": [1000, 20000]} | {
        str(n): {"tree_pss_mib": pss, "driver_peak_mib": 300.0, "cpu_ms_per_image": 4.0}
        for n, pss in ((1000, 700.0), (20000, 710.0))}
    results = RESULTS | {"growth": {"figures": {}, "stages": {"ingest": row}}}
    p = plan.estimate(_cfg(tmp_path), plan.Corpus(1e6, 1e4, 0), results=results)
    ingest = next(s for s in p.stages if s.stage == "ingest")
    assert any("1000 -> 20000 images: peak PSS of the process tree 700 -> 710 MiB" in n for n in ingest.notes)


def test_hash_dedup_driver_heap_is_extrapolated_from_growth(tmp_path):
    row = {"growth_sizes": [1000, 20000]} | {
        str(n): {"tree_pss_mib": 1000.0, "driver_peak_mib": drv, "cpu_ms_per_image": 1.0}
        for n, drv in ((1000, 300.0), (5000, 400.0), (20000, 550.0))}  # 150 MiB over the last 15,000 images
    results = RESULTS | {"growth": {"figures": {}, "stages": {"hash_dedup": row}}}
    hw = plan.Hardware(cpus=100, gpus=0, gpu="a100", driver_cpus=4, driver_gpus=0, driver_memory_gib=64)
    p = plan.estimate(_cfg(tmp_path), plan.Corpus(1e9, 0, 0), hw, results=results)
    hd = next(s for s in p.stages if s.stage == "hash_dedup")
    assert hd.memory_bytes == pytest.approx(150 * 2**20 / 15_000 * 1e9)
    assert any("driver heap measured to grow 10.2 KiB per image" in n for n in hd.notes)
    assert any(w.startswith("hash_dedup: needs") and "whole catalog" in w for w in p.warnings)


def test_record_and_load_results_round_trip(tmp_path):
    plan.record_result("filters", {"nsfw": {"core_s_per_image": 0.5}}, {"nproc": 2}, results_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{")
    got = plan.load_results(tmp_path)
    assert set(got) == {"filters"} and got["filters"]["figures"]["nsfw"]["core_s_per_image"] == 0.5


def test_defaults_are_the_k8s_cluster_maxima():
    rc = yaml.safe_load((REPO / "infra" / "k8s" / "raycluster.yaml").read_text())["spec"]
    groups = {g["groupName"]: g for g in rc["workerGroupSpecs"]}

    def limits(spec):
        return spec["template"]["spec"]["containers"][0]["resources"]["limits"]

    assert plan.CLUSTER_CPUS == groups["cpu"]["maxReplicas"] * int(limits(groups["cpu"])["cpu"])
    assert plan.CLUSTER_GPUS == groups["gpu"]["maxReplicas"] * int(limits(groups["gpu"])["nvidia.com/gpu"])
    assert plan.DRIVER_CPUS == int(limits(rc["headGroupSpec"])["cpu"])
    assert f"{plan.DRIVER_MEMORY_GIB}Gi" == limits(rc["headGroupSpec"])["memory"]


def test_corpus_counted_from_sources(tmp_path):
    (tmp_path / "urls.txt").write_text("http://a/1.jpg\nhttp://a/2.jpg\n\nhttp://a/3.jpg\n")
    (tmp_path / "cur").mkdir()
    for name in ("a.jpg", "b.png", "notes.txt"):
        (tmp_path / "cur" / name).write_bytes(b"x")
    cfg = _cfg(tmp_path, sources={"uncurated": [{"name": "web", "urls": "urls.txt"}],
                                  "curated": [{"name": "cur", "images": "cur"}]})
    assert plan.corpus_for(cfg, None, None, None) == plan.Corpus(3, 2, 0)
    assert plan.corpus_for(cfg, 1e9, None, 5) == plan.Corpus(1e9, 2, 5)


def test_lvd_plan_command(capsys):
    args = ["plan", "--config", str(LVD142M), "--images", "1.2e9", "--curated", "19e6", "--eval", "1e5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("STAGE"))
    assert header.split()[:8] == ["STAGE", "IMAGES", "BYTES", "OUT", "FLOPS", "MEMORY", "CPU-H", "GPU-H"]
    assert all(any(line.startswith(s + " ") for line in out.splitlines()) for s in plan.PLAN_STAGES)
    assert "bottleneck: " in out
    assert main([*args, "--json", "--driver-gpus", "8"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["hardware"]["driver_gpus"] == 8 and len(doc["stages"]) == len(plan.PLAN_STAGES)
    assert main(["plan", "--config", str(LVD142M)]) == 2  # placeholder sources cannot be counted
    assert "pass --images N" in capsys.readouterr().err
