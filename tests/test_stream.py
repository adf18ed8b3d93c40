"""Streaming training batches from Parquet files through Ray Data: exact resume, crops, actors, errors."""
import io
import itertools
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from model.data.collate import collate_data_and_cast
from model.data.sampling import SamplePlan
from model.data.stream import (COLLATE_KEYS, CropSchedule, ParquetImageReader, StepBatcher, build_augmentation,
                               build_mask_generator, step_spec, stream_batches)
from model.ssl.config import SSLConfig
from model.train import local

CFG = SSLConfig().with_updates(crops={"global_crops_size": 28, "local_crops_size": 14, "local_crops_number": 2})
COUNTS = [5, 6, 4]
BATCH = 3


def _encode(rng, fmt):
    arr = rng.integers(0, 256, (int(rng.integers(32, 49)), int(rng.integers(32, 49)), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def _write(path, images):
    pq.write_table(pa.table({"image_id": [f"{path.stem}-{i}" for i in range(len(images))],
                             "image": pa.array(images, pa.binary())}), path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("lvd"), np.random.default_rng(0)
    fmts = ["PNG", "JPEG", "WEBP"]
    return [_write(root / f"part-{f:05d}.parquet", [_encode(rng, fmts[(f + i) % 3]) for i in range(n)])
            for f, n in enumerate(COUNTS)]


@pytest.fixture(scope="module")
def corrupt_files(tmp_path_factory):
    root, rng = tmp_path_factory.mktemp("bad"), np.random.default_rng(1)
    images = [_encode(rng, "PNG") for _ in range(4)]
    images[2] = b"not an image at all"
    return [_write(root / "bad.parquet", images)]


def _spec(step, rank=0, world_size=1, seed=0, crops=CropSchedule.from_config(CFG)):
    plan = SamplePlan(COUNTS, world_size=world_size, rank=rank, batch_size=BATCH, seed=seed)
    return step_spec(plan, step, crops)


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert type(a[k]) is type(b[k]) and a[k] == b[k], k


# ----------------------------------------------------------------------------------- in process

def test_batch_has_the_keys_dtypes_and_shapes_of_collate(files):
    batch = StepBatcher(files, COUNTS, CFG, seed=0, rank=0).make_batch(_spec(0))
    reference = collate_data_and_cast([({"global_crops": [torch.zeros(3, 28, 28)] * 2,
                                         "local_crops": [torch.zeros(3, 14, 14)] * 2}, None)] * BATCH,
                                      n_tokens=4, rng=random.Random(0))
    assert list(batch) == [*reference, "step"] and list(reference) == list(COLLATE_KEYS)
    for k, v in reference.items():
        assert type(batch[k]) is type(v)
        if isinstance(v, torch.Tensor):
            assert batch[k].dtype == v.dtype, k
    assert batch["step"] == 0
    assert batch["collated_global_crops"].shape == (2 * BATCH, 3, 28, 28)
    assert batch["collated_local_crops"].shape == (2 * BATCH, 3, 14, 14)
    assert batch["collated_masks"].shape == (2 * BATCH, 4)
    assert batch["n_masked_patches"].item() == batch["mask_indices_list"].numel() <= batch["upperbound"]


def test_recipe_matches_the_local_loop_builders():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    outs = []
    for aug in (build_augmentation(CFG), local.build_augmentation(CFG)):
        torch.manual_seed(7)
        outs.append(aug(img))
    assert all(torch.equal(a, b) for a, b in zip(outs[0]["global_crops"] + outs[0]["local_crops"],
                                                 outs[1]["global_crops"] + outs[1]["local_crops"]))
    assert repr(build_mask_generator(CFG)) == repr(local.build_mask_generator(CFG))


def test_a_step_is_a_function_of_seed_rank_and_step_only(files):
    spec = _spec(2)
    a = StepBatcher(files, COUNTS, CFG, seed=0, rank=0).make_batch(spec)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    other = StepBatcher(files, COUNTS, CFG, seed=0, rank=0, cache_files=1)
    other.make_batch(_spec(4))  # other steps first, other cache
    assert_same(other.make_batch(spec), a)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's torch RNG is left alone
    c = StepBatcher(files, COUNTS, CFG, seed=1, rank=0).make_batch(spec)  # same images, another seed
    assert not torch.equal(a["collated_global_crops"], c["collated_global_crops"])
    d = StepBatcher(files, COUNTS, CFG, seed=0, rank=1).make_batch(spec)  # same images, another rank
    assert not torch.equal(a["collated_global_crops"], d["collated_global_crops"])


def test_each_file_is_read_once_per_pass(files):
    plan = SamplePlan(COUNTS, world_size=1, rank=0, batch_size=BATCH, seed=0)
    reader = ParquetImageReader(files, COUNTS, cache_files=1)
    for f, r in plan.pass_order(0):
        reader.read(f, r)
    assert reader.files_read == len(files)


def test_corrupt_images_and_wrong_row_counts_are_clear_errors(corrupt_files, files):
    reader = ParquetImageReader(corrupt_files, [4])
    assert reader.image(0, 1).mode == "RGB"
    with pytest.raises(ValueError, match=r"cannot decode the image in row 2 of .*bad\.parquet \(file 0\)"):
        reader.image(0, 2)
    with pytest.raises(ValueError, match=r"part-00001\.parquet \(file 1\) has 6 rows, expected 7"):
        ParquetImageReader(files, [5, 7, 4]).read(1, 0)
    with pytest.raises(IndexError, match="row 9 out of range"):
        ParquetImageReader(files, COUNTS).read(0, 9)


def test_crop_schedule_switches_at_the_given_step():
    s = CropSchedule.from_config(CFG, highres_from_step=3, highres_global_size=42, highres_local_size=28)
    assert [s(t) for t in (0, 2, 3, 10)] == [(28, 14), (28, 14), (42, 28), (42, 28)]
    assert CropSchedule(28, 14, 1, 56)(1) == (56, 14)
    with pytest.raises(ValueError, match="needs highres_global_size"):
        CropSchedule(28, 14, 1)


# ----------------------------------------------------------------------------------- through Ray Data

def _stream(files, n=None, **kwargs):
    args = dict(rank=0, world_size=1, batch_size=BATCH, seed=0) | kwargs
    batches = stream_batches(files, COUNTS, CFG, **args)
    out = list(itertools.islice(batches, n))
    batches.close()  # stops Ray Data's execution of the current window
    return out


def test_resumed_stream_is_bit_identical(files, ray_session):
    full = _stream(files, start_step=0, num_steps=5, window=2, concurrency=2)  # 3 windows, 2 tasks at a time
    resumed = _stream(files, 2, start_step=3, num_steps=None)  # endless, closed after 2 steps
    assert [b["step"] for b in full] == [0, 1, 2, 3, 4] and [b["step"] for b in resumed] == [3, 4]
    for a, b in zip(full[3:], resumed):
        assert_same(a, b)
    # the transport loses nothing: equal to the batch made in this process
    assert_same(full[4], StepBatcher(files, COUNTS, CFG, seed=0, rank=0).make_batch(_spec(4)))


def test_high_resolution_switch_changes_crops_and_masks_at_its_step(files, ray_session):
    crops = CropSchedule.from_config(CFG, highres_from_step=2, highres_global_size=42, highres_local_size=28)
    out = _stream(files, rank=1, world_size=2, num_steps=4, crops_for_step=crops)
    shapes = [(tuple(b["collated_global_crops"].shape[-2:]), tuple(b["collated_local_crops"].shape[-2:]),
               tuple(b["collated_masks"].shape)) for b in out]
    assert shapes == [((28, 28), (14, 14), (6, 4))] * 2 + [((42, 42), (28, 28), (6, 9))] * 2
    assert_same(out[2], StepBatcher(files, COUNTS, CFG, seed=0, rank=1).make_batch(_spec(2, 1, 2, crops=crops)))


def test_stream_from_inside_a_ray_actor(files, ray_session):
    import ray

    @ray.remote(num_cpus=0.5)
    class Worker:  # stands in for a Ray Train worker
        def run(self, files):
            from model.data.stream import stream_batches
            from model.ssl.config import SSLConfig

            cfg = SSLConfig().with_updates(crops={"global_crops_size": 28, "local_crops_size": 14,
                                                  "local_crops_number": 2})
            return list(stream_batches(files, [5, 6, 4], cfg, rank=1, world_size=2, batch_size=3, seed=0,
                                       start_step=1, num_steps=3))

    worker = Worker.remote()
    try:
        out = ray.get(worker.run.remote(files), timeout=300)
    finally:
        ray.kill(worker)
    assert [b["step"] for b in out] == [1, 2, 3]
    assert_same(out[2], StepBatcher(files, COUNTS, CFG, seed=0, rank=1).make_batch(_spec(3, 1, 2)))


def test_a_corrupt_image_fails_the_stream_naming_file_and_row(corrupt_files, ray_session):
    with pytest.raises(Exception, match=r"cannot decode the image in row 2 of .*bad\.parquet"):
        list(stream_batches(corrupt_files, [4], CFG, rank=0, world_size=1, batch_size=4, seed=0, num_steps=1))


@pytest.mark.parametrize("kwargs,match", [
    (dict(row_counts=[5, 6]), "3 files but 2 row counts"),
    (dict(start_step=-1), "start_step must be >= 0"),
    (dict(num_steps=-2), "num_steps must be >= 0"),
    (dict(concurrency=0), "concurrency >= 1"),
    (dict(world_size=20, rank=0), r"15 rows in 3 files, fewer than world_size=20"),
    (dict(rank=1), r"rank must be in \[0, 1\)"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(crops_for_step=lambda step: (10, 10)), "smaller than the patch size 14"),
])
def test_stream_argument_errors(files, kwargs, match):
    args = dict(row_counts=COUNTS, rank=0, world_size=1, batch_size=BATCH, seed=0, num_steps=1) | kwargs
    with pytest.raises(ValueError, match=match):
        stream_batches(files, args.pop("row_counts"), CFG, **args)  # raised on the call, before any iteration
