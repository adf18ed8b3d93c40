"""`lvd plan`: what a config costs at a corpus size, before any work is done.

Per curation stage: images in, bytes written, FLOPs, memory of the largest process, CPU core-hours,
GPU-hours and wall-hours on a stated cluster, and which stage is the bottleneck. The figures come
from three places, each named in the output:

* measured on this machine: the benchmarks (``benchmarks/*.py``) record their figures in
  ``benchmarks/results/<name>.json`` (``record_result``); per-image stages use measured core-seconds
  per image, and FLOP counts are turned into time with FLOP rates measured here;
* counted: embedding FLOPs from the model's architecture (open_clip configs, DINOv2 dims), FAISS
  memory from the index kind (flat / IVF-Flat / IVF-PQ code sizes), k-means as n·k·d·iterations;
* assumed (constants below, each with its source): GPU peak throughputs, the fraction of peak
  reached, the bytes of a fetched web image, the paper's funnel (1.2B → 1.1B → 744M → 142M).

Vector stages (copy_dedup, cluster, retrieve) run FAISS in one process, the driver: their time
uses the driver's GPUs (or CPUs) only, and their memory must fit in the driver's node.
Nothing here imports torch or FAISS.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, ConfigError
from pipeline.embedding.spec import ModelSpec, parse_spec
from pipeline.hashing import PCA_CHUNK

RESULTS_DIR = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
PLAN_STAGES = ("ingest", "hash_dedup", "nsfw", "face_blur", "embed", "copy_dedup", "cluster", "retrieve", "dataset")
# Which benchmark measures what `plan` needs (the fallback message names it).
BENCHMARK_OF = {"ingest": "ingest", "hash_dedup": "filters", "nsfw": "filters", "face_blur": "filters",
                "embed": "embed", "copy_dedup": "vectors", "cluster": "vectors", "retrieve": "vectors"}

# ---------------------------------------------------------------- assumptions (each with its source)


@dataclass(frozen=True)
class Gpu:
    name: str
    fp16_tflops: float  # dense tensor-core peak
    fp32_tflops: float
    memory_gib: int
    source: str


GPUS = {
    "v100": Gpu("V100-SXM2-32GB", 125.0, 15.7, 32, "NVIDIA Tesla V100 datasheet (the paper's GPU)"),
    "a100": Gpu("A100-SXM4-80GB", 312.0, 19.5, 80, "NVIDIA A100 datasheet (dense, no sparsity)"),
    "h100": Gpu("H100-SXM5-80GB", 989.0, 67.0, 80, "NVIDIA H100 datasheet (dense, no sparsity)"),
}
MFU = 0.4  # assumed fraction of fp16 peak for ViT inference at large batch (typical 30–50 %)
FAISS_GPU_EFFICIENCY = 0.3  # assumed fraction of fp32 peak for FAISS GPU search / k-means (GEMM + list scans)
DOWNLOAD_KIB = 150.0  # assumed mean bytes of a fetched web image (JPEG photos: typically 100–200 KB)
# The paper's funnel (DINOv2 §3 / App. A, DESIGN.md "Paper settings"): 1.2B unique uncurated images,
# ~1.1B after copy dedup, ~744M after removing near-copies of evaluation sets; LVD-142M has
# 142,109,386 images; dedup + retrieval took < 2 days on 20 nodes x 8 V100-32GB.
PAPER_UNCURATED = 1.2e9
COPY_KEEP = 1.1e9 / 1.2e9
EVAL_KEEP = 744e6 / 1.1e9
DATASET_RATIO = 142_109_386 / 1.2e9
PAPER_DEDUP_RETRIEVAL_GPU_HOURS = 20 * 8 * 48
# The cluster of infra/k8s/raycluster.yaml at its maxima (tests/test_plan.py checks they agree).
CLUSTER_CPUS = 100 * 32
CLUSTER_GPUS = 20 * 8
DRIVER_CPUS = 16
DRIVER_MEMORY_GIB = 256
BANDWIDTH_GBPS = 10.0  # assumed egress bandwidth of the crawl (all ingest workers together)
ID_BYTES = 8  # FAISS stores one int64 id per vector


# ---------------------------------------------------------------- measured figures


def record_result(name: str, figures: dict, machine: dict | None = None, when: str | None = None,
                  results_dir: Path = RESULTS_DIR) -> Path:
    """Write a benchmark's figures where `lvd plan` reads them: ``<results_dir>/<name>.json``."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{name}.json"
    doc = {"benchmark": name, "when": when or time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "machine": machine or {"nproc": _nproc(), "python": platform.python_version()}, "figures": figures}
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path


def _nproc() -> int:
    import os

    return os.cpu_count() or 1


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    """Every recorded benchmark result, by benchmark name (missing or unreadable files are skipped)."""
    out = {}
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(doc, dict):
            out[doc.get("benchmark", path.stem)] = doc
    return out


def missing_message(stage: str) -> str:
    bench = BENCHMARK_OF[stage]
    return f"no measured figure for {stage}: run `.venv/bin/python benchmarks/{bench}.py` (writes benchmarks/results/{bench}.json)"


# ---------------------------------------------------------------- counted: FLOPs and memory


@dataclass(frozen=True)
class VitArch:
    """The dimensions that set a ViT's FLOPs (ours, DINOv2's and open_clip's towers alike)."""
    image_size: int
    patch_size: int
    width: int
    layers: int
    mlp_ratio: float = 4.0
    out_dim: int = 0  # projection after the tower (open_clip); 0 = none
    registers: int = 0

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1 + self.registers

    @property
    def embed_dim(self) -> int:
        return self.out_dim or self.width


# model.layers.vit factories (DINOv2's official dims; patch 14, 224 px at embedding time)
DINOV2_DIMS = {"vit_small": (384, 12, 4.0), "vit_base": (768, 12, 4.0), "vit_large": (1024, 24, 4.0),
               "vit_giant2": (1536, 40, 8192 * 2 / 3 / 1536)}


def vit_flops(a: VitArch) -> float:
    """FLOPs (2 per multiply-add) of one image through a ViT: patch embedding, per block QKV, the
    two attention matmuls, the output projection and the MLP, then the projection head."""
    t, w = a.tokens, a.width
    patches = (a.image_size // a.patch_size) ** 2
    patch_embed = 2 * patches * (3 * a.patch_size ** 2) * w
    per_block = 2 * t * w * 3 * w + 2 * 2 * t * t * w + 2 * t * w * w + 2 * 2 * t * w * int(a.mlp_ratio * w)
    return float(patch_embed + a.layers * per_block + 2 * w * a.out_dim)


def open_clip_arch(name: str) -> VitArch:
    """The vision tower of an open_clip model config, read from open_clip's JSON (no import of open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("open_clip is not installed: cannot count the embedding FLOPs")
    path = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{name}.json"
    if not path.is_file():
        raise ConfigError(f"open_clip has no model config {name!r} ({path})")
    cfg = json.loads(path.read_text())
    v = cfg["vision_cfg"]
    if "layers" not in v or not isinstance(v["layers"], int) or "patch_size" not in v:
        raise ConfigError(f"open_clip model {name!r} is not a plain ViT: plan counts ViT FLOPs only")
    return VitArch(image_size=int(v.get("image_size", 224)), patch_size=int(v["patch_size"]), width=int(v["width"]),
                   layers=int(v["layers"]), mlp_ratio=float(v.get("mlp_ratio", 4.0)), out_dim=int(cfg["embed_dim"]))


def model_arch(spec: str | ModelSpec) -> VitArch:
    """The ViT dimensions of an embedding model spec."""
    s = parse_spec(spec) if isinstance(spec, str) else spec
    if s.family == "open_clip":
        return open_clip_arch(s.arch)
    if s.family == "dinov2" and s.arch in DINOV2_DIMS:
        w, layers, ratio = DINOV2_DIMS[s.arch]
        return VitArch(224, 14, w, layers, ratio)
    raise ConfigError(f"plan counts FLOPs for open_clip ViTs and dinov2:<arch> specs, not {spec!r}")


def embedding_flops(spec: str | ModelSpec) -> float:
    return vit_flops(model_arch(spec))


def index_bytes(kind: str, n: float, d: int, nlist: int, pq_m: int) -> float:
    """Memory of a FAISS inner-product index over n float32 vectors of dimension d:
    flat: the vectors; IVF-Flat: vectors + ids + coarse centroids; IVF-PQ: pq_m-byte codes + ids +
    coarse centroids + PQ codebooks (256 centroids per sub-quantizer, 8 bits)."""
    if kind == "flat":
        return n * d * 4
    coarse = nlist * d * 4
    if kind == "ivf":
        return n * (d * 4 + ID_BYTES) + coarse
    if kind == "ivfpq":
        return n * (pq_m + ID_BYTES) + coarse + 256 * d * 4
    raise ValueError(f"unknown index kind {kind!r}")


def search_flops(kind: str, n_index: float, n_queries: float, d: int, nlist: int, nprobe: int, pq_m: int) -> float:
    """FLOPs of n_queries kNN searches: exhaustive for flat; coarse assignment + nprobe lists for IVF
    (IVF-PQ: a 256·d distance table per probed list, then one add per code byte)."""
    if kind == "flat":
        return 2.0 * n_queries * n_index * d
    per_list = n_index / max(nlist, 1)
    coarse = 2.0 * nlist * d
    if kind == "ivf":
        fine = 2.0 * nprobe * per_list * d
    else:
        fine = nprobe * (2.0 * 256 * d + per_list * pq_m)
    return n_queries * (coarse + fine)


def kmeans_flops(n: float, k: int, d: int, iters: int, max_points_per_centroid: int = 256) -> float:
    """Spherical k-means as the cluster stage runs it: trained on at most k·256 rows (FAISS's
    sample), iters × (n_train · k · d) multiply-adds, then every row assigned once."""
    n_train = min(n, k * max_points_per_centroid)
    return 2.0 * n_train * k * d * iters + 2.0 * n * k * d


# ---------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Hardware:
    cpus: int = CLUSTER_CPUS
    gpus: int = CLUSTER_GPUS
    gpu: str = "v100"
    driver_cpus: int = DRIVER_CPUS
    driver_gpus: int = 0
    driver_memory_gib: float = DRIVER_MEMORY_GIB
    bandwidth_gbps: float = BANDWIDTH_GBPS


@dataclass(frozen=True)
class Corpus:
    uncurated: float
    curated: float = 0.0
    eval: float = 0.0


@dataclass
class StageEstimate:
    stage: str
    images: float
    bytes_out: float = 0.0
    flops: float | None = None
    memory_bytes: float | None = None  # the largest single process (vector stages: the driver)
    cpu_hours: float | None = None
    gpu_hours: float | None = None
    wall_hours: float | None = None
    basis: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class Plan:
    config: str
    corpus: Corpus
    hardware: Hardware
    stages: list[StageEstimate]
    bottleneck: str | None
    warnings: list[str]
    assumptions: list[str]
    measured: dict[str, str]

    def as_dict(self) -> dict:
        return asdict(self)


class _Measured:
    """The recorded benchmark figures plan uses, with a note for each one that is missing."""

    def __init__(self, results: dict[str, dict]):
        self.results = results
        self.missing: list[str] = []

    def fig(self, bench: str, *keys: str) -> Any:
        node: Any = self.results.get(bench, {}).get("figures")
        for k in keys:
            node = node.get(k) if isinstance(node, dict) else None
        return node

    def need(self, stage: str, *keys: str) -> Any:
        value = self.fig(BENCHMARK_OF[stage], *keys)
        if value is None:
            msg = missing_message(stage)
            if msg not in self.missing:
                self.missing.append(msg)
        return value


def _per_image_cpu(m: _Measured, stage: str, n: float) -> tuple[float | None, str]:
    core_s = m.need(stage, "core_s_per_image") if stage == "ingest" else m.need(stage, stage, "core_s_per_image")
    if core_s is None:
        return None, "not measured"
    return n * core_s / 3600, f"measured {1000 * core_s:.1f} core-ms/image ({BENCHMARK_OF[stage]}.json)"


def _stored_kib(m: _Measured, cfg: Config) -> tuple[float, str]:
    kib, side = m.need("ingest", "stored_kib_per_image"), m.need("ingest", "max_side")
    if kib is None or side is None:
        return 100.0, "assumed 100 KiB/image stored (ingest not measured)"
    target = cfg.ingest.max_side or 1024
    scaled = kib * (target / side) ** 2
    return scaled, f"stored {scaled:.0f} KiB/image: measured {kib:.1f} KiB at {side} px, scaled by pixels to {target} px (an upper bound)"


def _device_rate(hw: Hardware, gpu: Gpu, gpus: int, cpus: int, cpu_flops_per_core: float | None) -> float | None:
    if gpus > 0:
        return gpus * gpu.fp32_tflops * 1e12 * FAISS_GPU_EFFICIENCY
    return cpus * cpu_flops_per_core if cpu_flops_per_core else None


def _vector_stage(est: StageEstimate, flops: float, hw: Hardware, m: _Measured, task: str) -> None:
    """Time of a FAISS stage in the driver: its GPUs if any, else its CPUs at the FLOP rate measured here."""
    gpu = GPUS[hw.gpu]
    est.flops = flops
    est.gpu_hours = flops / (gpu.fp32_tflops * 1e12 * FAISS_GPU_EFFICIENCY) / 3600
    cpu_rate = m.need(task, task, "flops_per_core_s")
    if cpu_rate:
        est.cpu_hours = flops / cpu_rate / 3600
    rate = _device_rate(hw, gpu, hw.driver_gpus, hw.driver_cpus, cpu_rate)
    est.wall_hours = flops / rate / 3600 if rate else None
    where = f"{hw.driver_gpus} driver GPU(s)" if hw.driver_gpus else f"{hw.driver_cpus} driver CPU(s)"
    est.basis = f"FAISS in the driver on {where}" + (f"; CPU rate measured {cpu_rate / 1e9:.0f} GFLOP/s/core" if cpu_rate else "")


def _index_choice(cfg_index: Any, n: float, d: int) -> tuple[str, int, int]:
    from pipeline.vectors.index import default_nlist, default_pq_m  # numpy only

    kind = cfg_index.kind
    if kind == "auto":
        kind = "flat" if n <= cfg_index.flat_max else ("ivfpq" if cfg_index.pq_m else "ivf")
    nlist = cfg_index.nlist or default_nlist(int(n), 100_000)
    return kind, min(nlist, 100_000), cfg_index.pq_m or default_pq_m(d)


def estimate(cfg: Config, corpus: Corpus, hw: Hardware = Hardware(), results: dict[str, dict] | None = None) -> Plan:
    """The plan of ``cfg`` for ``corpus`` on ``hw`` from the recorded benchmark ``results``."""
    m = _Measured(load_results() if results is None else results)
    gpu = GPUS[hw.gpu]
    warnings: list[str] = []
    u, c, e = corpus.uncurated, corpus.curated, corpus.eval
    kept_copy = u * COPY_KEEP
    kept = kept_copy * EVAL_KEEP
    arch = model_arch(cfg.embed.model)
    d = arch.embed_dim
    stored_kib, stored_note = _stored_kib(m, cfg)
    stages: list[StageEstimate] = []

    ing = StageEstimate("ingest", u + c + e, bytes_out=(u + c + e) * stored_kib * 1024)
    ing.cpu_hours, ing.basis = _per_image_cpu(m, "ingest", u + c + e)
    download = u * DOWNLOAD_KIB * 1024
    net_h = download * 8 / (hw.bandwidth_gbps * 1e9) / 3600
    ing.wall_hours = max(net_h, (ing.cpu_hours or 0) / hw.cpus)
    ing.notes += [f"downloads {_bytes(download)} (assumed {DOWNLOAD_KIB:.0f} KiB/image): {net_h:,.0f} h at {hw.bandwidth_gbps:g} Gbit/s",
                  stored_note]
    stages.append(ing)

    for name in ("hash_dedup", "nsfw", "face_blur"):
        st = StageEstimate(name, u)
        st.cpu_hours, st.basis = _per_image_cpu(m, name, u)
        st.wall_hours = st.cpu_hours / hw.cpus if st.cpu_hours is not None else None
        if name == "face_blur":
            st.bytes_out = u * stored_kib * 1024
        if name == "hash_dedup":
            hd = cfg.hash_dedup
            codes = u * hd.bits / 8 * 2  # codes + the binary index over them, in the driver
            # fit_pca streams the sample into a d x d scatter matrix: the sampled thumbnails (uint8, d bytes each)
            # stay in the driver, plus a few MB of chunk and matrix whatever the sample size
            side2 = hd.thumb_size ** 2
            pca = min(u, hd.pca_sample) * side2 + PCA_CHUNK * 8 * side2 * 8 * 3 + side2 * side2 * 8 * 4
            st.memory_bytes = codes + pca
            st.notes.append(f"driver: {hd.bits}-bit codes of every image for the range search ({_bytes(codes)}) and the "
                            f"PCA fit over {_count(min(u, hd.pca_sample))} sampled thumbnails ({_bytes(pca)})")
        stages.append(st)

    n_embed = u + c + e
    emb = StageEstimate("embed", n_embed, bytes_out=n_embed * (2 * d + 80), flops=n_embed * vit_flops(arch))
    emb.gpu_hours = emb.flops / (gpu.fp16_tflops * 1e12 * MFU) / 3600
    cpu_rate = m.need("embed", "flops_per_core_s")
    emb.cpu_hours = emb.flops / cpu_rate / 3600 if cpu_rate else None
    on_gpu = cfg.embed.device != "cpu" and hw.gpus > 0
    emb.wall_hours = emb.gpu_hours / hw.gpus if on_gpu else (emb.cpu_hours / hw.cpus if emb.cpu_hours else None)
    emb.basis = (f"{vit_flops(arch) / 1e9:.0f} GFLOP/image counted ({cfg.embed.model}: {arch.layers} blocks, width "
                 f"{arch.width}, {arch.tokens} tokens); GPU at {MFU:.0%} of {gpu.name} fp16 peak"
                 + (f"; CPU rate measured {cpu_rate / 1e9:.0f} GFLOP/s/core" if cpu_rate else ""))
    stages.append(emb)

    cd = cfg.copy_dedup
    kind, nlist, pq_m = _index_choice(cd.index, u, d)
    copy = StageEstimate("copy_dedup", u + e)
    flops = search_flops(kind, u, u, d, nlist, cd.index.nprobe, pq_m) + search_flops(kind, u, e, d, nlist, cd.index.nprobe, pq_m)
    _vector_stage(copy, flops, hw, m, "copy_dedup")
    idx = index_bytes(kind, u, d, nlist, pq_m)
    copy.memory_bytes = idx + (u + e) * d * 4
    copy.notes.append(f"index {kind} (nlist {nlist}, pq_m {pq_m}, nprobe {cd.index.nprobe}): {_bytes(idx)}; "
                      f"float32 vectors in the driver: {_bytes((u + e) * d * 4)}; k={cd.k}")
    copy.notes.append(f"kept: {_count(kept_copy)} after copies, {_count(kept)} after eval near-copies (paper ratios)")
    stages.append(copy)

    cl = cfg.cluster
    k = min(cl.n_clusters, int(kept))
    clu = StageEstimate("cluster", kept)
    _vector_stage(clu, kmeans_flops(kept, k, d, cl.niter), hw, m, "cluster")
    clu.memory_bytes = kept * d * 4 + min(kept, k * 256) * d * 4 + k * d * 4
    clu.notes.append(f"k={k:,}, {cl.niter} iterations on {_count(min(kept, k * 256))} sampled rows, then all assigned")
    stages.append(clu)

    rt = cfg.retrieve
    kind_r, nlist_r, pq_m_r = _index_choice(rt.index, kept, d)
    ret = StageEstimate("retrieve", c)
    _vector_stage(ret, search_flops(kind_r, kept, c, d, nlist_r, rt.index.nprobe, pq_m_r), hw, m, "retrieve")
    idx_r = index_bytes(kind_r, kept, d, nlist_r, pq_m_r)
    ret.memory_bytes = idx_r + (kept + c) * d * 4
    ret.notes.append(f"{_count(c)} curated queries against {_count(kept)} kept images; index {kind_r}: {_bytes(idx_r)}")
    stages.append(ret)

    ds = StageEstimate("dataset", u * DATASET_RATIO, bytes_out=u * DATASET_RATIO * stored_kib * 1024)
    ds.basis = f"paper ratio {DATASET_RATIO:.3f} of the uncurated pool (142.1M of 1.2B)"
    stages.append(ds)

    _growth_notes(m, stages)
    for st in stages:
        if st.memory_bytes and st.memory_bytes > hw.driver_memory_gib * 2**30 and st.stage in ("copy_dedup", "cluster", "retrieve", "hash_dedup"):
            why = ("it groups duplicates over the whole catalog there" if st.stage == "hash_dedup" else
                   "vector stages load every kept embedding as float32 in the driver")
            warnings.append(f"{st.stage}: needs {_bytes(st.memory_bytes)} in one process (the driver), more than its "
                            f"{hw.driver_memory_gib:g} GiB: {why}")
    if kind in ("ivf", "ivfpq") and (cd.index.nlist or 0) > 100_000 // 39:
        warnings.append(f"copy_dedup/retrieve: nlist {cd.index.nlist} is trained on 100,000 sampled rows (IndexSpec."
                        f"train_sample), {100_000 // max(cd.index.nlist, 1)} per list; FAISS wants >= 39")
    timed = [s for s in stages if s.wall_hours]
    bottleneck = max(timed, key=lambda s: s.wall_hours).stage if timed else None
    assumptions = [
        f"GPU {gpu.name}: {gpu.fp16_tflops:g} TFLOPS fp16, {gpu.fp32_tflops:g} fp32 ({gpu.source}); ViT inference at "
        f"{MFU:.0%} of fp16 peak, FAISS at {FAISS_GPU_EFFICIENCY:.0%} of fp32 peak (assumed)",
        f"cluster: {hw.cpus:,} CPUs and {hw.gpus:,} GPUs for Ray stages; the driver: {hw.driver_cpus} CPUs, "
        f"{hw.driver_gpus} GPUs, {hw.driver_memory_gib:g} GiB (infra/k8s/raycluster.yaml maxima by default)",
        f"funnel: the paper's ratios (1.2B -> 1.1B -> 744M; dataset 142.1M); copy/eval thresholds "
        f"{cd.threshold}/{cd.eval_threshold} (paper 0.6/0.45)",
        f"paper anchor: dedup + retrieval < 2 days on 20 x 8 V100 = {PAPER_DEDUP_RETRIEVAL_GPU_HOURS:,} GPU-hours",
    ]
    measured = {name: f"{doc.get('when', '?')} on {doc.get('machine', {}).get('nproc', '?')} CPUs"
                for name, doc in m.results.items()}
    return Plan(str(cfg.path or cfg.name), corpus, hw, stages, bottleneck, warnings + m.missing, assumptions, measured)


def _growth_notes(m: _Measured, stages: list[StageEstimate]) -> None:
    """Per stage, how its peak memory moved with corpus size in benchmarks/growth.py (if recorded)."""
    for st in stages:
        row = m.results.get("growth", {}).get("stages", {}).get(st.stage) or {}
        small, large = (str(n) for n in row.get("growth_sizes", (0, 0)))
        if small != large and small in row and large in row:
            lo, hi = row[small], row[large]
            st.notes.append(f"measured growth {small} -> {large} images: peak PSS of the process tree "
                            f"{lo['tree_pss_mib']:.0f} -> {hi['tree_pss_mib']:.0f} MiB, driver {lo['driver_peak_mib']:.0f} -> "
                            f"{hi['driver_peak_mib']:.0f} MiB, CPU {lo['cpu_ms_per_image']:.1f} -> "
                            f"{hi['cpu_ms_per_image']:.1f} ms/image (growth.json)")
        if st.stage == "hash_dedup":  # decides over the whole catalog in the driver: its heap grows per image
            sizes = sorted((int(n) for n in row if n.isdigit()))[-2:]
            if len(sizes) == 2:
                a, b = (row[str(n)]["driver_peak_mib"] for n in sizes)
                per_image = max(0.0, (b - a) * 2**20 / (sizes[1] - sizes[0]))
                heap = per_image * st.images
                st.memory_bytes = max(st.memory_bytes or 0.0, heap)
                st.notes.append(f"driver heap measured to grow {per_image / 1024:.1f} KiB per image ({sizes[0]} -> "
                                f"{sizes[1]} images, growth.json): ~{_bytes(heap)} here")


# ---------------------------------------------------------------- corpus size from the sources


def count_sources(cfg: Config, kind: str) -> float | None:
    """Images of a kind's sources when they can be counted cheaply (URL lists, image folders); None if not."""
    from pipeline.sources import IMAGE_EXTENSIONS  # the extensions ingest reads

    total = 0
    for src in getattr(cfg.sources, kind):
        if src.warc:
            return None
        if src.urls is not None:
            n = _count_urls(src.urls)
            if n is None:
                return None
            total += n
        if src.images is not None:
            if not src.images.is_dir():
                return None
            total += sum(1 for p in src.images.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return float(total)


def _count_urls(path: Path) -> int | None:
    if not path.is_file():
        return None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows
    with path.open("rb") as fh:
        lines = sum(1 for line in fh if line.strip())
    return lines - 1 if path.suffix == ".csv" else lines


def corpus_for(cfg: Config, uncurated: float | None, curated: float | None, eval_: float | None) -> Corpus:
    counts = {}
    for kind, given in (("uncurated", uncurated), ("curated", curated), ("eval", eval_)):
        counts[kind] = given if given is not None else count_sources(cfg, kind)
        if counts[kind] is None:
            flag = {"uncurated": "--images", "curated": "--curated", "eval": "--eval"}[kind]
            raise ConfigError(f"the {kind} sources of {cfg.path or cfg.name} cannot be counted (WARC files, or paths "
                              f"that do not exist here): pass {flag} N")
    return Corpus(counts["uncurated"], counts["curated"], counts["eval"])


# ---------------------------------------------------------------- output


def _si(x: float, unit: str = "", base: float = 1000.0) -> str:
    for prefix in ("", "k", "M", "G", "T", "P", "E", "Z"):
        if abs(x) < base or prefix == "Z":
            return f"{x:.3g} {prefix}{unit}".strip() if unit else f"{x:.3g}{prefix}"
        x /= base
    return str(x)


def _bytes(x: float) -> str:
    return _si(x, "B")


def _count(x: float) -> str:
    return _si(x).replace("G", "B")


def _hours(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 10 else f"{x:.2g}")


def format_plan(plan: Plan) -> str:
    """The plan as a table in the style of `lvd status`, then the bottleneck, warnings and assumptions."""
    table = [("STAGE", "IMAGES", "BYTES OUT", "FLOPS", "MEMORY", "CPU-H", "GPU-H", "WALL-H", "BASIS")]
    for s in plan.stages:
        table.append((s.stage, _count(s.images), _bytes(s.bytes_out) if s.bytes_out else "-",
                      f"{s.flops:.2e}" if s.flops else "-", _bytes(s.memory_bytes) if s.memory_bytes else "-",
                      _hours(s.cpu_hours), _hours(s.gpu_hours), _hours(s.wall_hours), s.basis))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    for s in plan.stages:
        lines += [f"  {s.stage}: {n}" for n in s.notes]
    c = plan.corpus
    lines.insert(0, f"plan for {plan.config}: {_count(c.uncurated)} uncurated, {_count(c.curated)} curated, "
                    f"{_count(c.eval)} eval images")
    if plan.bottleneck:
        b = next(s for s in plan.stages if s.stage == plan.bottleneck)
        lines.append(f"bottleneck: {b.stage} ({_hours(b.wall_hours)} wall-hours: {b.basis})")
    lines += [f"warning: {w}" for w in plan.warnings]
    lines += [f"assumption: {a}" for a in plan.assumptions]
    lines += [f"measured: benchmarks/results/{k}.json ({v})" for k, v in sorted(plan.measured.items())]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `lvd plan` options (the CLI registers the command and calls ``run``)."""
    hw = Hardware()
    p.add_argument("--images", type=float, help="uncurated images (default: counted from the sources), e.g. 1.2e9")
    p.add_argument("--curated", type=float, help="curated images (default: counted from the sources)")
    p.add_argument("--eval", type=float, help="evaluation images (default: counted from the sources)")
    p.add_argument("--gpu", choices=sorted(GPUS), default=hw.gpu, help=f"GPU model (default {hw.gpu}, the paper's)")
    p.add_argument("--gpus", type=int, default=hw.gpus, help=f"GPUs of the Ray cluster (default {hw.gpus})")
    p.add_argument("--cpus", type=int, default=hw.cpus, help=f"CPUs of the Ray cluster (default {hw.cpus})")
    p.add_argument("--driver-gpus", type=int, default=hw.driver_gpus, help="GPUs of the driver's node (FAISS stages)")
    p.add_argument("--driver-cpus", type=int, default=hw.driver_cpus, help="CPUs of the driver's node (FAISS stages)")
    p.add_argument("--driver-memory-gib", type=float, default=hw.driver_memory_gib, help="memory of the driver's node")
    p.add_argument("--bandwidth-gbps", type=float, default=hw.bandwidth_gbps, help="crawl bandwidth, Gbit/s")
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="benchmark results folder")
    p.add_argument("--json", action="store_true", help="the plan as JSON")


def run(cfg: Config, args: argparse.Namespace) -> int:
    corpus = corpus_for(cfg, args.images, args.curated, args.eval)
    hw = Hardware(cpus=args.cpus, gpus=args.gpus, gpu=args.gpu, driver_cpus=args.driver_cpus,
                  driver_gpus=args.driver_gpus, driver_memory_gib=args.driver_memory_gib,
                  bandwidth_gbps=args.bandwidth_gbps)
    plan = estimate(cfg, corpus, hw, load_results(args.results))
    print(json.dumps(plan.as_dict(), indent=2, default=str) if args.json else format_plan(plan))
    return 0
