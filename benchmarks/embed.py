"""Embed-stage benchmark: `embed` on Ray Data vs a plain torch loop in the driver.

    .venv/bin/python benchmarks/embed.py [--images 400] [--model open_clip:ViT-B-32:none] [--out benchmarks/out]
                                         [--shard-rows N] [--batch-size 32]

One run:
1. builds N JPEGs with ``benchmarks/filters.py``'s corpus builder (``ensure_images``: crops of the
   real photos shipped with scikit-image / scikit-learn, cached) into <out>/embed_images — a folder
   of its own, since the builder keeps exactly N files in its folder and filters.py's cache
   (<out>/filter_images) must not be cut down;
2. runs the real ``ingest`` stage through ``pipeline.engine.Engine`` on a config with that folder
   as one uncurated ``images:`` source (fresh root <out>/embed/root every run), ``shard_rows``
   = ceil(N / 4) so there are 4 ingest shards, ``embed: {model: SPEC, batch_size: 32}`` and
   concurrency / num_cpus left at their defaults (one actor per CPU, one CPU each);
3. starts Ray once (``pipeline.raydata.ensure_ray``), timed and reported separately;
4. runs ``face_blur`` (``embed`` reads face_blur's blurred bytes for uncurated sources) — reported,
   not counted; it also warms up Ray Data's machinery;
5. times ``engine.ensure("embed", force=True)`` (plan, Ray Data: shard reads, the EmbedBatch actor
   pool with one model load per actor, shard writes, manifest);
6. a PLAIN LOOP in this process, no Ray: the same images (the ok rows of the same face_blur shards,
   read with ``engine.read``), the same ``Embedder`` (same spec / device / precision as the actors),
   ``Embedder.embed`` over batches of ``embed.batch_size``, torch threads = number of CPUs;
   reading and model loading included (and itemised);
7. compares the float16 vectors of the two per image_id (max abs diff, NaN rows, missing ids),
   prints a table and writes everything to <out>/embed_benchmark.json.

Wall time, CPU of our process tree and of everything else on the machine (it may be shared), and
which Ray workers ran data tasks come from filters.py's ``Clock`` (samples /proc every 0.25 s).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
for _p in (str(REPO), str(BENCH_DIR)):  # run as a script from anywhere; filters.py is imported from here
    if _p not in sys.path:
        sys.path.insert(0, _p)

from filters import Clock, MapShardsTimer, ensure_images, machine_info  # noqa: E402

SOURCE_NAME = "bench"
DEFAULT_MODEL = "open_clip:ViT-B-32:none"  # random weights: no download
MIN_SHARDS = 4


# --------------------------------------------------------------------------- config


def write_config(folder: Path, images: Path, shard_rows: int, model: str, batch_size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "name": "bench-embed",
        "root": str(folder / "root"),
        "sources": {"uncurated": [{"name": SOURCE_NAME, "images": str(images)}], "curated": [], "eval": []},
        "engine": {"shard_rows": shard_rows, "verify": "checksum"},
        "ray": {"address": None},
        # concurrency / num_cpus / device / precision at their defaults: what a user gets.
        "embed": {"model": model, "batch_size": batch_size},
    }
    path = folder / "bench-embed.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# --------------------------------------------------------------------------- vectors


def vectors_of(table: pa.Table) -> tuple[list[str], np.ndarray]:
    """(image_ids, float16 [n, dim]) of an embeddings table; null embeddings become NaN rows."""
    arr = table["embedding"].combine_chunks()
    dim = arr.type.list_size
    vals = arr.values.slice(arr.offset * dim, len(arr) * dim).to_numpy(zero_copy_only=False)
    vecs = np.asarray(vals, dtype=np.float16).reshape(len(arr), dim).copy()
    nulls = arr.is_null().to_numpy(zero_copy_only=False)
    vecs[nulls] = np.nan
    return table["image_id"].to_pylist(), vecs


def compare(engine: Any, plain: dict, model_id: str) -> dict:
    t = engine.read_table("embed", partition=SOURCE_NAME, columns=["image_id", "embedding", "model"])
    ids, vecs = vectors_of(t)
    ray_rows = {i: k for k, i in enumerate(ids)}
    common = [(ray_rows[i], k) for k, i in enumerate(plain["ids"]) if i in ray_rows]
    a = vecs[[r for r, _ in common]].astype(np.float32)
    b = plain["vecs"][[k for _, k in common]].astype(np.float32)
    nan_a, nan_b = np.isnan(a).any(axis=1), np.isnan(b).any(axis=1)
    both = ~nan_a & ~nan_b
    diff = np.abs(a[both] - b[both])
    cos = (a[both] * b[both]).sum(axis=1)
    models = sorted(set(t["model"].to_pylist()))
    return {"stage_rows": t.num_rows, "plain_rows": len(plain["ids"]), "compared": int(both.sum()),
            "missing_in_stage": len(plain["ids"]) - len(common), "extra_in_stage": t.num_rows - len(common),
            "nan_rows_stage": int(nan_a.sum()), "nan_rows_plain": int(nan_b.sum()),
            "nan_mismatch": int((nan_a != nan_b).sum()),
            "max_abs_diff_f16": float(diff.max()) if diff.size else None,
            "mean_abs_diff_f16": float(diff.mean()) if diff.size else None,
            "identical_rows": int((diff.max(axis=1) == 0).sum()) if diff.size else 0,
            "min_cosine": float(cos.min()) if cos.size else None,
            "stage_model_ids": models, "plain_model_id": model_id, "model_id_match": models == [model_id]}


# --------------------------------------------------------------------------- the two runs


def run_ray(engine: Any, timer: MapShardsTimer) -> dict:
    sec = engine.config.embed
    timer.reset()
    with Clock() as c:
        status = engine.ensure("embed", force=True)
    inside = sum(call["seconds"] for call in timer.calls)
    return {"seconds": c.seconds, "driver_cpu_s": c.cpu_s, "tree_cpu_s": c.tree_cpu_s, "others_cpu_s": c.others_cpu_s,
            "loadavg_1m": c.loadavg, "rows": status.rows, "state": status.state, "counts": status.counts,
            "computed": status.computed, "fingerprint": status.fingerprint,
            "ray_worker_slots": max((call["worker_slots"] for call in timer.calls), default=0), **c.workers(),
            "map_shards_calls": timer.calls, "inside_map_shards_s": inside, "outside_map_shards_s": c.seconds - inside,
            "batch_size": sec.batch_size, "num_cpus_per_actor": sec.num_cpus, "concurrency_setting": sec.concurrency}


def run_plain(engine: Any, images_stage: str, spec: str, threads: int) -> tuple[dict, dict]:
    import torch

    from pipeline.embedding import Embedder

    sec = engine.config.embed
    torch.set_num_threads(threads)
    parts: dict[str, float] = {}
    with Clock() as c:
        t = time.monotonic()
        tables = [s.filter(pc.equal(s["status"], "ok"))
                  for s in engine.read(images_stage, partition=SOURCE_NAME, columns=["image_id", "image", "status"])]
        table = pa.concat_tables(tables)
        parts["read_s"] = time.monotonic() - t
        t = time.monotonic()
        embedder = Embedder(spec, device=sec.device, precision=sec.precision)
        parts["model_load_s"] = time.monotonic() - t
        t = time.monotonic()
        blobs = table["image"].to_pylist()
        bs = sec.batch_size
        vecs = np.concatenate([embedder.embed(blobs[i:i + bs]) for i in range(0, len(blobs), bs)]) if blobs \
            else np.zeros((0, embedder.dim), np.float16)
        parts["embed_s"] = time.monotonic() - t
    out = {"images": table.num_rows, "seconds": c.seconds, "cpu_s": c.cpu_s, "others_cpu_s": c.others_cpu_s,
           "loadavg_1m": c.loadavg, "parts": parts, "batch_size": bs, "torch_threads": torch.get_num_threads(),
           "embedder": repr(embedder), "weights": embedder.weights_source}
    return out, {"ids": table["image_id"].to_pylist(), "vecs": vecs, "model_id": embedder.model_id}


def actor_threads_probe(num_cpus: float) -> dict:
    """What torch sees in a Ray worker given the actors' ``num_cpus`` (Ray sets OMP_NUM_THREADS)."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    def probe() -> dict:
        import torch

        return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

    return ray.get(probe.remote())


# --------------------------------------------------------------------------- driver


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark the embed stage on Ray Data against a plain torch loop.")
    p.add_argument("--images", type=int, default=1200, help="number of images (default 1200: enough for actor start-up to amortise)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"embed.model spec (default {DEFAULT_MODEL}: random weights)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    p.add_argument("--shard-rows", type=int, default=None,
                   help=f"engine.shard_rows (default ceil(images / {MIN_SHARDS}): {MIN_SHARDS} ingest shards)")
    p.add_argument("--batch-size", type=int, default=32, help="embed.batch_size, also the plain loop's (default 32)")
    p.add_argument("--progress", action="store_true", help="keep Ray Data's progress bars (off by default)")
    args = p.parse_args(argv)
    if args.images < 1:
        p.error("--images must be at least 1")
    shard_rows = args.shard_rows or max(1, math.ceil(args.images / MIN_SHARDS))
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.monotonic()

    from pipeline.config import load_config
    from pipeline.embedding import WeightsUnavailable, check_weights
    from pipeline.engine import Engine
    from pipeline.engine.kept import images_stage
    from pipeline.raydata import ensure_ray
    from pipeline.stages.embed import _absolute_spec
    import pipeline.stages.perimage as perimage_mod

    try:
        weights = check_weights(args.model)
    except (WeightsUnavailable, ValueError) as err:
        raise SystemExit(f"--model {args.model}: {err}") from None
    cpus_local = os.cpu_count() or 1
    machine = machine_info()
    print(f"machine: nproc={machine['nproc']}, CPU: {machine['cpu_model']}, RAM {machine['memory']}, "
          f"Python {machine['python']}; load average {os.getloadavg()[0]:.2f}", flush=True)
    images = ensure_images(out / "embed_images", args.images)
    print(f"images: {images['count']} JPEGs, {images['total_mib']} MiB, KiB min/median/max {images['kib']['min']}/"
          f"{images['kib']['median']}/{images['kib']['max']}, long side px {images['long_side_px']['min']}/"
          f"{images['long_side_px']['median']}/{images['long_side_px']['max']}", flush=True)

    work = out / "embed"
    root = work / "root"
    if root.exists():
        shutil.rmtree(root)
    config = load_config(write_config(work, out / "embed_images", shard_rows, args.model, args.batch_size))
    engine = Engine(config, show_progress=args.progress)
    spec = _absolute_spec(config.embed.model, config.path.parent if config.path else None)
    print(f"model: {spec} ({weights}); embed section {config.embed.model_dump(mode='json')}", flush=True)

    print("ingest (real stage, local folder source) …", flush=True)
    with Clock() as ci:
        ing = engine.ensure("ingest")
    ingest_shards = len(engine.shard_refs("ingest", partition=SOURCE_NAME))
    ingest = {"seconds": round(ci.seconds, 2), "rows": ing.rows, "counts": ing.counts, "shards": ingest_shards,
              "shard_rows": shard_rows}
    print(f"  {ing.rows} rows in {ingest_shards} shard(s) of <= {shard_rows}, {ci.seconds:.1f}s, counts {ing.counts}",
          flush=True)

    import ray

    with Clock() as cr:
        ensure_ray(config)
    ray.data.DataContext.get_current().enable_progress_bars = args.progress
    if not args.progress:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray_cpus = ray.cluster_resources().get("CPU")
    ray_info = {"version": ray.__version__, "start_s": round(cr.seconds, 2), "cpus": ray_cpus}
    print(f"ray {ray.__version__}: started in {cr.seconds:.1f}s ({ray_cpus:.0f} CPUs; not counted in stage times)",
          flush=True)

    src_stage = images_stage(engine, "embed", "uncurated")
    print(f"{src_stage} (embed's input for uncurated sources; not counted) …", flush=True)
    with Clock() as cf:
        up = engine.ensure(src_stage)
    upstream = {"stage": src_stage, "seconds": round(cf.seconds, 2), "rows": up.rows, "counts": up.counts,
                "shards": len(engine.shard_refs(src_stage, partition=SOURCE_NAME))}
    print(f"  {up.rows} rows in {upstream['shards']} shard(s), {cf.seconds:.1f}s", flush=True)

    timer = MapShardsTimer()
    perimage_mod.map_shards = timer.wrap(perimage_mod.map_shards)  # Embed.compute -> PerImageStage.compute

    print("embed: Ray Data run (engine.ensure('embed', force=True)) …", flush=True)
    ray_fig = run_ray(engine, timer)
    calls = ray_fig["map_shards_calls"]
    print(f"  {ray_fig['seconds']:.1f}s, {ray_fig['rows']} rows, counts {ray_fig['counts']}; inside map_shards "
          f"{ray_fig['inside_map_shards_s']:.1f}s, first output shard after {[c['first_output_s'] for c in calls]}s; "
          f"{ray_fig['ray_worker_slots']} actor slot(s), {ray_fig['busy_workers']} seen busy: "
          + "; ".join(f"pid {w['pid']} CPU {w['cpu_s']}s" for w in ray_fig["workers"][:4]), flush=True)

    print(f"embed: plain loop (this process, no Ray, torch threads {cpus_local}) …", flush=True)
    plain_fig, plain_data = run_plain(engine, src_stage, spec, cpus_local)
    print(f"  {plain_fig['seconds']:.1f}s, parts " + ", ".join(f"{k} {v:.1f}" for k, v in plain_fig["parts"].items()),
          flush=True)

    check = compare(engine, plain_data, plain_data["model_id"])
    probe = actor_threads_probe(config.embed.num_cpus)
    ray.shutdown()

    n = plain_fig["images"]
    ray_ips = n / ray_fig["seconds"]
    plain_ips = n / plain_fig["seconds"]
    loop_ips = n / plain_fig["parts"]["embed_s"] if plain_fig["parts"]["embed_s"] else None
    summary = {"images": n, "ray_s": round(ray_fig["seconds"], 2), "ray_images_per_s": round(ray_ips, 2),
               "plain_s": round(plain_fig["seconds"], 2), "plain_images_per_s": round(plain_ips, 2),
               "plain_loop_only_images_per_s": round(loop_ips, 2) if loop_ips else None,
               "throughput_ratio_ray_over_plain": round(ray_ips / plain_ips, 3), "target_ratio": 0.9,
               "meets_target": ray_ips / plain_ips >= 0.9,
               "ray_tree_cpu_s": round(ray_fig["tree_cpu_s"], 1), "plain_cpu_s": round(plain_fig["cpu_s"], 1),
               "others_cpu_s_during_ray": round(ray_fig["others_cpu_s"], 1),
               "others_cpu_s_during_plain": round(plain_fig["others_cpu_s"], 1)}

    print()
    print(f"embed benchmark — {n} images ({images['kib']['median']} KiB median, long side "
          f"{images['long_side_px']['median']} px median), {ingest_shards} shards of <= {shard_rows} rows; model {spec}; "
          f"batch {config.embed.batch_size}; nproc={machine['nproc']}; Ray {ray.__version__} start-up "
          f"{ray_info['start_s']:.1f}s (not counted)")
    head = f"{'run':<34} {'seconds':>8} {'images/s':>9} {'our CPU s':>9} {'others CPU s':>12} {'load 1m':>7}"
    print(head)
    print("-" * len(head))
    slots = f"{ray_fig['ray_worker_slots']} actor(s) x {probe['torch_threads']} thr"
    for label, s, cpu, others, load in (
            (f"Ray Data ({slots})", ray_fig["seconds"], ray_fig["tree_cpu_s"], ray_fig["others_cpu_s"],
             ray_fig["loadavg_1m"]),
            (f"plain loop (1 proc x {plain_fig['torch_threads']} thr)", plain_fig["seconds"], plain_fig["cpu_s"],
             plain_fig["others_cpu_s"], plain_fig["loadavg_1m"])):
        print(f"{label:<34} {s:>8.1f} {n / s:>9.2f} {cpu:>9.0f} {others:>12.0f} {load:>7.2f}")
    print(f"Ray/plain throughput: {summary['throughput_ratio_ray_over_plain']:.2f}x (target >= 0.9x: "
          f"{'met' if summary['meets_target'] else 'NOT met'})")
    print(f"plain parts: read {plain_fig['parts']['read_s']:.1f}s, model load {plain_fig['parts']['model_load_s']:.1f}s, "
          f"embed loop {plain_fig['parts']['embed_s']:.1f}s ({loop_ips:.2f} img/s without read and load); "
          f"Ray: inside map_shards {ray_fig['inside_map_shards_s']:.1f}s, first output shard after "
          f"{[c['first_output_s'] for c in calls]}s; actors' torch threads {probe}")
    print(f"vectors: {check['compared']} compared, max |diff| {check['max_abs_diff_f16']} (float16), "
          f"{check['identical_rows']} identical rows, min cosine {check['min_cosine']}, missing in stage "
          f"{check['missing_in_stage']}, NaN rows stage/plain {check['nan_rows_stage']}/{check['nan_rows_plain']}, "
          f"model ids match: {check['model_id_match']}")
    print("Ray s = wall time of engine.ensure('embed', force=True) (plan + Ray Data incl. actor start-up and model load "
          "+ shard writes + manifest); plain s = engine.read of the same shards + Embedder load + the batch loop. "
          "our CPU s: Ray = whole process tree, plain = this process; others CPU s = CPU used meanwhile by processes "
          "that are not ours (non-zero: the machine is shared and timings are noisy).")

    total_s = time.monotonic() - t_all
    report = {"benchmark": "embed", "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine,
              "images": images, "ingest": ingest, "upstream": upstream, "ray": ray_info,
              "settings": {"model": spec, "weights": weights, "shard_rows": shard_rows, "config": str(config.path),
                           "embed_section": config.embed.model_dump(mode="json"), "plain_torch_threads": cpus_local,
                           "ray_data_progress_bars": args.progress},
              "results": {"summary": summary, "ray": ray_fig, "plain": plain_fig, "check": check,
                          "actor_threads_probe": probe},
              "total_run_s": round(total_s, 1)}
    json_path = out / "embed_benchmark.json"
    json_path.write_text(json.dumps(report, indent=2, default=str))
    print(f"wrote {json_path} (whole run {total_s:.0f}s)")
    from pipeline.plan import record_result

    print(f"wrote {record_result('embed', plan_figures(report), machine, report['when'])} (read by `lvd plan`)")
    return 0


def plan_figures(report: dict) -> dict:
    """The figures `lvd plan` reads (benchmarks/results/embed.json). The CPU FLOP rate comes from the
    plain loop alone (no reading, no model load) over its torch threads, with FLOPs counted from the
    model's architecture."""
    from pipeline.plan import embedding_flops

    s, settings = report["results"]["summary"], report["settings"]
    flops = embedding_flops(settings["model"])
    threads = settings["plain_torch_threads"]
    loop_ips = s["plain_loop_only_images_per_s"] or s["plain_images_per_s"]
    workers = report["results"]["ray"]["ray_worker_slots"]
    return {"model": settings["model"], "images": s["images"], "images_per_s": s["ray_images_per_s"],
            "workers": workers, "core_s_per_image": round(s["ray_s"] * workers / s["images"], 6),
            "flops_per_image": flops, "flops_per_core_s": round(flops * loop_ips / threads)}


if __name__ == "__main__":
    sys.exit(main())
