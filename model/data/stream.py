"""Stream one rank's DINOv2 training batches from the LVD Parquet files through Ray Data, deterministically.

Per step ``t`` of rank ``r``: the :class:`~model.data.sampling.SamplePlan` names the batch's rows
``(file_idx, row_idx)``; a Ray Data task (:class:`StepBatcher`) reads their ``image`` column
(caching the last files it read), decodes them to RGB, applies ``DataAugmentationDINO`` and
collates them with iBOT masks (``collate_data_and_cast``), and the consumer gets the collated batch
back as torch tensors with the keys and dtypes of ``collate_data_and_cast``, plus ``"step"``.

Determinism: a step's batch depends only on ``(seed, rank, step)``, the files and the config —
never on where the stream started, which worker process made it, or what else ran there.
The augmentation's randomness comes from torch's *global* RNG (torchvision v2 transforms draw
from it), so each step runs under ``torch.random.fork_rng`` with ``torch.manual_seed(seed of
(seed, rank, step))`` (the process's RNG state is restored afterwards; one step at a time per
process), and the iBOT masks (ratios, shuffle, blocks) draw from a ``random.Random`` seeded from
the same triple. A training run killed after step ``t`` and restarted with ``start_step=t + 1``
therefore sees exactly the batches it would have seen.

Pipeline (:func:`stream_batches`): ``ray.data.from_items`` with one item per step, built per window
of ``window`` steps (a 100k-step run never materialises 100k items), one block per step →
``map_batches(batch_size=1)`` as at most ``concurrency`` Ray tasks of ``num_cpus`` each →
``iter_batches`` in order (``preserve_order`` is set on each window's own ``DataContext``, and the
consumer checks that steps arrive consecutively). Tasks, not an actor pool: Ray reuses its worker
processes, so each window starts in a warm process (torch imported, the process's
:class:`StepBatcher` and its file cache kept), where a new actor pool would take seconds to start.

Layering: this module is in ``model/data`` and imports nothing above it; ``SSLConfig`` is only a
type annotation (read by attribute). The builders below are the DINOv2 recipe with explicit crop
sizes; ``model/train/local.py`` has the same three builders for the config's own sizes.
"""
from __future__ import annotations

import io
import random
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from model.data.augmentations import DataAugmentationDINO
from model.data.recipe import build_augmentation, build_collate, build_mask_generator
from model.data.sampling import SamplePlan

if TYPE_CHECKING:
    from model.ssl.config import SSLConfig

__all__ = [
    "COLLATE_KEYS", "CropSchedule", "StepSpec", "ParquetImageReader", "StepBatcher",
    "build_augmentation", "build_mask_generator", "build_collate", "step_seeds", "step_spec",
    "to_numpy", "to_torch", "stream_batches",
]

# the keys of collate_data_and_cast's output, in its order
COLLATE_KEYS = ("collated_global_crops", "collated_local_crops", "collated_masks", "mask_indices_list",
                "masks_weight", "upperbound", "n_masked_patches")
IMAGE_COLUMN = "image"
_STEP_SEED_TAG = 2  # the sample plan's streams use tags 0 and 1 (model.data.sampling)
_TORCH_RNG_LOCK = threading.Lock()  # the global torch RNG is seeded per step: one step at a time per process


# --------------------------------------------------------------------------------------------- recipe



@dataclass(frozen=True)
class CropSchedule:
    """``step -> (global_size, local_size)``: the base sizes, then the high-resolution sizes from ``highres_from_step``.

    DINOv2 ends pretraining with a short phase at a higher resolution (e.g. global 518 / local 98
    with patch 14); the iBOT masks follow the global crop's patch grid.
    """

    global_size: int
    local_size: int
    highres_from_step: int | None = None
    highres_global_size: int | None = None
    highres_local_size: int | None = None

    def __post_init__(self) -> None:
        if self.highres_from_step is not None and self.highres_global_size is None:
            raise ValueError("highres_from_step needs highres_global_size")

    @classmethod
    def from_config(cls, cfg: SSLConfig, *, highres_from_step: int | None = None,
                    highres_global_size: int | None = None, highres_local_size: int | None = None) -> "CropSchedule":
        """The config's crop sizes, optionally switching to high resolution at ``highres_from_step``."""
        return cls(cfg.crops.global_crops_size, cfg.crops.local_crops_size, highres_from_step,
                   highres_global_size, highres_local_size)

    def __call__(self, step: int) -> tuple[int, int]:
        if self.highres_from_step is not None and step >= self.highres_from_step:
            assert self.highres_global_size is not None
            return self.highres_global_size, self.highres_local_size or self.local_size
        return self.global_size, self.local_size


# --------------------------------------------------------------------------------------------- one step

def step_seeds(seed: int, rank: int, step: int) -> tuple[int, int]:
    """``(torch seed, mask seed)`` of one step: 64-bit values derived from ``(seed, rank, step)``."""
    words = np.random.SeedSequence([seed, rank, step, _STEP_SEED_TAG]).generate_state(4, np.uint32).tolist()
    return (words[0] << 32) | words[1], (words[2] << 32) | words[3]


@dataclass(frozen=True)
class StepSpec:
    """What one step's batch is made of: its rows and its crop sizes."""

    step: int
    files: tuple[int, ...]
    rows: tuple[int, ...]
    global_size: int
    local_size: int

    def to_item(self) -> dict[str, Any]:
        """A Ray Data row."""
        return {"step": self.step, "files": list(self.files), "rows": list(self.rows),
                "global_size": self.global_size, "local_size": self.local_size}

    @classmethod
    def from_item(cls, item: dict[str, Any]) -> "StepSpec":
        return cls(int(item["step"]), tuple(int(f) for f in item["files"]), tuple(int(r) for r in item["rows"]),
                   int(item["global_size"]), int(item["local_size"]))


def batch_nbytes(cfg: SSLConfig, batch_size: int, global_size: int, local_size: int) -> int:
    """Approximate bytes of one collated batch (float32 crops, masks): the unit of the stream's memory budget."""
    n_global = 2 * batch_size
    crops = n_global * 3 * global_size**2 + batch_size * cfg.crops.local_crops_number * 3 * local_size**2
    patches = n_global * (global_size // cfg.student.patch_size) ** 2
    return 4 * crops + 13 * patches  # masks: bool + int64 index + float32 weight per masked patch at most


def step_spec(plan: SamplePlan, step: int, crops_for_step: Callable[[int], tuple[int, int]]) -> StepSpec:
    """The spec of ``plan``'s batch at ``step`` with the crop sizes of that step."""
    pairs = plan.batch(step)
    g, l = crops_for_step(step)
    return StepSpec(step, tuple(f for f, _ in pairs), tuple(r for _, r in pairs), int(g), int(l))


class ParquetImageReader:
    """Encoded images by ``(file_idx, row_idx)``; keeps the ``image`` column of the last ``cache_files`` files read."""

    def __init__(self, files: Sequence[str | Path], row_counts: Sequence[int], *, cache_files: int = 2,
                 column: str = IMAGE_COLUMN) -> None:
        if len(files) != len(row_counts):
            raise ValueError(f"{len(files)} files but {len(row_counts)} row counts")
        if cache_files < 1:
            raise ValueError(f"cache_files must be >= 1, got {cache_files}")
        self.files = [str(f) for f in files]
        self.row_counts = [int(n) for n in row_counts]
        self.cache_files = cache_files
        self.column = column
        self._cache: OrderedDict[int, pa.ChunkedArray] = OrderedDict()
        self.files_read = 0  # how many times a file was read (cache misses)

    def _column(self, f: int) -> pa.ChunkedArray:
        if f in self._cache:
            self._cache.move_to_end(f)
            return self._cache[f]
        col = pq.read_table(self.files[f], columns=[self.column])[self.column]
        self.files_read += 1
        if len(col) != self.row_counts[f]:
            raise ValueError(f"{self.files[f]} (file {f}) has {len(col)} rows, expected {self.row_counts[f]}")
        self._cache[f] = col
        while len(self._cache) > self.cache_files:
            self._cache.popitem(last=False)
        return col

    def read(self, f: int, row: int) -> bytes:
        """The encoded bytes of row ``row`` of file ``f``."""
        if not 0 <= f < len(self.files):
            raise IndexError(f"file index {f} out of range [0, {len(self.files)})")
        if not 0 <= row < self.row_counts[f]:
            raise IndexError(f"row {row} out of range [0, {self.row_counts[f]}) in {self.files[f]} (file {f})")
        value = self._column(f)[row].as_py()
        if value is None:
            raise ValueError(f"row {row} of {self.files[f]} (file {f}) has no image")
        return value

    def image(self, f: int, row: int) -> Image.Image:
        """Row ``row`` of file ``f`` decoded to an RGB PIL image; a clear error naming the file and row otherwise."""
        data = self.read(f, row)
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.convert("RGB")
        except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError, ...)
            raise ValueError(f"cannot decode the image in row {row} of {self.files[f]} (file {f}): "
                             f"{type(e).__name__}: {e}") from e


class StepBatcher:
    """Makes the collated batch of a :class:`StepSpec` (one per Ray worker process in :func:`stream_batches`).

    ``make_batch`` returns the torch dict (as ``collate_data_and_cast`` + ``"step"``), usable in
    process; ``__call__`` takes a one-row Arrow batch of ``StepSpec.to_item()`` rows and returns
    :func:`to_numpy` arrays.
    """

    def __init__(self, files: Sequence[str | Path], row_counts: Sequence[int], ssl_cfg: SSLConfig, *, seed: int,
                 rank: int, cache_files: int = 2) -> None:
        self.reader = ParquetImageReader(files, row_counts, cache_files=cache_files)
        self.cfg = ssl_cfg
        self.seed, self.rank = int(seed), int(rank)
        self._augmentations: dict[tuple[int, int], DataAugmentationDINO] = {}

    def _augmentation(self, global_size: int, local_size: int) -> DataAugmentationDINO:
        key = (global_size, local_size)
        if key not in self._augmentations:
            self._augmentations[key] = build_augmentation(self.cfg, global_size, local_size)
        return self._augmentations[key]

    def make_batch(self, spec: StepSpec) -> dict[str, Any]:
        """Read, decode, augment and collate the step's images; bit-identical for the same (seed, rank, spec)."""
        images = [self.reader.image(f, r) for f, r in zip(spec.files, spec.rows)]
        aug = self._augmentation(spec.global_size, spec.local_size)
        torch_seed, mask_seed = step_seeds(self.seed, self.rank, spec.step)
        collate = build_collate(self.cfg, random.Random(mask_seed), spec.global_size)
        with _TORCH_RNG_LOCK, torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            samples = [(aug(im), None) for im in images]
        batch = collate(samples)
        batch["step"] = spec.step
        return batch

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        """A one-row Arrow batch of ``StepSpec.to_item()`` → that step's :func:`to_numpy` arrays."""
        items = batch.to_pylist()
        if len(items) != 1:
            raise ValueError(f"StepBatcher makes one step per call (map_batches batch_size=1), got {len(items)}")
        return to_numpy(self.make_batch(StepSpec.from_item(items[0])))


# One StepBatcher per Ray worker process, reused by the map tasks that run there (warm file cache,
# built augmentations); keyed by everything it is built from, so a different stream gets its own.
_BATCHERS: OrderedDict[tuple, StepBatcher] = OrderedDict()
_BATCHERS_KEPT = 1
_BATCHERS_LOCK = threading.Lock()


def _map_step(batch: pa.Table, *, files: list[str], row_counts: list[int], ssl_cfg: SSLConfig, seed: int, rank: int,
              cache_files: int) -> dict[str, np.ndarray]:
    """The Ray Data map function: this process's cached :class:`StepBatcher` applied to one step's row."""
    key = (tuple(files), tuple(row_counts), ssl_cfg.model_dump_json(), seed, rank, cache_files)
    with _BATCHERS_LOCK:
        batcher = _BATCHERS.get(key)
        if batcher is None:
            batcher = StepBatcher(files, row_counts, ssl_cfg, seed=seed, rank=rank, cache_files=cache_files)
            _BATCHERS[key] = batcher
            while len(_BATCHERS) > _BATCHERS_KEPT:
                _BATCHERS.popitem(last=False)
        _BATCHERS.move_to_end(key)
    return batcher(batch)


# --------------------------------------------------------------------------------------------- transport

def to_numpy(batch: dict[str, Any]) -> dict[str, np.ndarray]:
    """A collated batch (+ ``"step"``) as numpy arrays with a leading dimension of 1 (one Ray Data row)."""
    out: dict[str, np.ndarray] = {"step": np.array([batch["step"]], dtype=np.int64)}
    for key in COLLATE_KEYS:
        value = batch[key]
        out[key] = value.numpy()[None] if isinstance(value, torch.Tensor) else np.array([value], dtype=np.int64)
    return out


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    a = np.asarray(a)
    if not a.flags.writeable:  # zero-copy views of Ray's object store are read-only
        a = a.copy()
    return torch.from_numpy(a).to(dtype)


def to_torch(batch: dict[str, np.ndarray], i: int = 0) -> dict[str, Any]:
    """Row ``i`` of a numpy batch as the exact ``collate_data_and_cast`` dict (+ ``"step"``: int)."""
    return {
        "step": int(batch["step"][i]),
        "collated_global_crops": _tensor(batch["collated_global_crops"][i], torch.float32),
        "collated_local_crops": _tensor(batch["collated_local_crops"][i], torch.float32),
        "collated_masks": _tensor(batch["collated_masks"][i], torch.bool),
        "mask_indices_list": _tensor(batch["mask_indices_list"][i], torch.long),
        "masks_weight": _tensor(batch["masks_weight"][i], torch.float32),
        "upperbound": int(batch["upperbound"][i]),
        "n_masked_patches": _tensor(np.asarray(batch["n_masked_patches"][i]).reshape(1), torch.long),
    }


# --------------------------------------------------------------------------------------------- Ray Data

def stream_batches(
    files: Sequence[str | Path],
    row_counts: Sequence[int],
    ssl_cfg: SSLConfig,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    crops_for_step: Callable[[int], tuple[int, int]] | None = None,
    num_cpus: float = 0.5,
    concurrency: int = 1,
    prefetch: int = 2,
    window: int = 1000,
    cache_files: int = 2,
) -> Iterator[dict[str, Any]]:
    """Rank ``rank``'s batches for steps ``start_step, start_step + 1, ...`` (``num_steps`` of them; None: endless).

    Each item is the ``collate_data_and_cast`` dict (torch tensors, float32 crops) plus ``"step"``.
    ``crops_for_step`` (default: the config's sizes; see :class:`CropSchedule`) gives each step's
    ``(global, local)`` crop sizes. At most ``concurrency`` data tasks of ``num_cpus`` CPUs each run
    at once, and the stream runs at most about ``prefetch + 2 * concurrency`` steps ahead of the
    consumer. Needs a Ray connection (a Ray Train worker has one) with ``concurrency * num_cpus``
    CPUs free per rank besides the training workers' own (``num_cpus=0`` never waits for a CPU).
    Steps are produced in windows of ``window`` steps (one Ray Dataset each; a short pause between
    windows). Arguments are checked on the call, not on the first ``next()``.
    """
    import ray

    if len(files) != len(row_counts):
        raise ValueError(f"{len(files)} files but {len(row_counts)} row counts")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be >= 0 or None, got {num_steps}")
    if concurrency < 1 or window < 1 or prefetch < 0 or num_cpus < 0:
        raise ValueError(f"need concurrency >= 1, window >= 1, prefetch >= 0, num_cpus >= 0; got "
                         f"{concurrency}, {window}, {prefetch}, {num_cpus}")
    plan = SamplePlan(row_counts, world_size=world_size, rank=rank, batch_size=batch_size, seed=seed)
    crops = crops_for_step or CropSchedule.from_config(ssl_cfg)
    build_mask_generator(ssl_cfg, crops(start_step)[0])  # fail early on a crop smaller than a patch
    if not ray.is_initialized():
        raise RuntimeError("stream_batches needs a Ray connection: call ray.init() first (Ray Train workers have one)")
    pipeline = _Pipeline(
        fn_kwargs={"files": [str(f) for f in files], "row_counts": list(plan.row_counts), "ssl_cfg": ssl_cfg,
                   "seed": seed, "rank": rank, "cache_files": cache_files},
        cfg=ssl_cfg, batch_size=batch_size, num_cpus=num_cpus, concurrency=concurrency, prefetch=prefetch,
        # keep the data tasks on the consumer's node (the training worker's), any node if that one is full
        node_id=ray.get_runtime_context().get_node_id(),
    )
    return _iterate(plan, crops, pipeline, start_step, num_steps, window)


@dataclass(frozen=True)
class _Pipeline:
    """How one window of step specs becomes batches on Ray Data."""

    fn_kwargs: dict[str, Any]
    cfg: SSLConfig
    batch_size: int
    num_cpus: float
    concurrency: int
    prefetch: int
    node_id: str

    def batches(self, items: list[dict[str, Any]]) -> Iterator[dict[str, np.ndarray]]:
        """The numpy batches of ``items`` (``StepSpec.to_item()`` rows), in order."""
        import ray

        ds = ray.data.from_items(items, override_num_blocks=len(items))  # one block (one map call) per step
        options = ds.context.execution_options  # this dataset's own context, not the global one
        options.preserve_order = True
        # at most ~prefetch + 2 * concurrency finished batches in the object store (else up to Ray Data's
        # share of it: GBs of float32 crops at full scale)
        biggest = max(batch_nbytes(self.cfg, self.batch_size, it["global_size"], it["local_size"]) for it in items)
        options.resource_limits = ray.data.ExecutionResources.for_limits(
            object_store_memory=(self.prefetch + 2 * self.concurrency + 1) * biggest)
        ds = ds.map_batches(_map_step, fn_kwargs=self.fn_kwargs, batch_size=1, batch_format="pyarrow",
                            num_cpus=self.num_cpus,
                            compute=ray.data.TaskPoolStrategy(size=min(self.concurrency, len(items))),
                            label_selector={"ray.io/node-id": self.node_id}, fallback_strategy=[{"label_selector": {}}])
        return ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.prefetch)


def _iterate(plan: SamplePlan, crops: Callable[[int], tuple[int, int]], pipeline: _Pipeline, start_step: int,
             num_steps: int | None, window: int) -> Iterator[dict[str, Any]]:
    """The window loop of :func:`stream_batches`: specs of ``window`` steps at a time, batches checked in order."""
    end = None if num_steps is None else start_step + num_steps
    expected = start_step
    while end is None or expected < end:
        stop = expected + window if end is None else min(expected + window, end)
        for batch in pipeline.batches([step_spec(plan, t, crops).to_item() for t in range(expected, stop)]):
            for i in range(len(batch["step"])):
                out = to_torch(batch, i)
                if out["step"] != expected:
                    raise RuntimeError(f"Ray Data returned step {out['step']} where step {expected} was due")
                expected += 1
                yield out
        if expected != stop:
            raise RuntimeError(f"Ray Data returned steps up to {expected - 1} of the window ending at {stop - 1}")
