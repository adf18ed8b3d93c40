"""Vector-algorithm benchmark: our copy detection, retrieval and k-means against what they rest on.

    .venv/bin/python benchmarks/vectors.py [--n 200000] [--dim 256] [--queries 10000] [--out benchmarks/out]
                                           [--repeats 2] [--kmeans-k 1000] [--kmeans-iters 10] [--sklearn-n N]

One run:
1. generates n random-but-clustered L2-normalised vectors deterministically (numpy seed 0):
   2,000 random directions on the sphere, every row one of them plus isotropic noise (typical
   cosine between rows of one cluster ~0.4, between clusters ~0), and 2 % of the rows
   replaced by near-copies (cosine ~0.9) of other rows, so copy detection has real edges; plus
   ``--queries`` query rows drawn the same way but not in the pool (a "curated source");
2. copy_dedup: ``copy_components(x, k=64, threshold=0.6)`` vs the bare FAISS calls it rests on —
   the same index built the same way (same kind, nlist, seeded training sample, nprobe) and one
   ``index.search(x, 65)``. The default index is IVF-Flat (nlist ≈ 4·√n = 1,789, nprobe 16):
   an exact flat self-search of 200k×200k×256 takes minutes per run on 2 cores;
3. retrieve: ``sample_retrieval(pool, queries, k=4)`` (default spec: flat, exact, as n ≤ 200k)
   vs ``IndexFlatIP.add`` + ``search(queries, 4)``;
   each ratio is ours / bare (the target is ≤ 1.2×); results are cross-checked against the bare
   calls (same edges, same neighbours);
4. k-means: ``spherical_kmeans(x, k, niter)`` (FAISS, training on all rows since
   k · 256 ≥ n, plus the final assignment of every row) vs scikit-learn's ``KMeans`` on the same
   rows with the same k and iterations (``init="random"`` like FAISS, ``n_init=1``, ``tol=0`` so
   it runs every iteration, Lloyd); the mean cosine of rows to their (normalised) centroid shows
   the two reach the same quality. ``--sklearn-n`` runs scikit-learn on the first N rows only
   (and says so) if it is too slow;
5. prints a table and writes everything to <out>/vectors_benchmark.json.

Each timing is the minimum over ``--repeats`` runs (ours and bare alternate). The load average
before and after is recorded: on a shared machine other processes skew the figures, and OpenMP's
busy-waiting threads (FAISS, scikit-learn) suffer most — on this shared 2-core machine a run
could take 3× longer one minute than the next. So the script sets ``OMP_WAIT_POLICY=PASSIVE``
(threads sleep instead of spinning while they wait) before FAISS or scikit-learn load, for every
side alike; ``--omp-wait-policy ""`` leaves the environment as it is. The value is recorded.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # must precede loading libgomp (FAISS, scikit-learn): read once at start-up
    _policy = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--omp-wait-policy=")), "PASSIVE")
    if _policy and "OMP_WAIT_POLICY" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = _policy

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from pipeline.vectors.copydetect import copy_components  # noqa: E402
from pipeline.vectors.index import IndexSpec, default_nlist, train_rows  # noqa: E402
from pipeline.vectors.kmeans import spherical_kmeans  # noqa: E402
from pipeline.vectors.retrieval import sample_retrieval  # noqa: E402

CENTERS = 2000
NOISE = 1.2  # per-row noise norm relative to the unit centre
COPY_FRACTION = 0.02
COPY_NOISE = 0.45  # near-copy noise norm: cosine ~0.9 to the original
K_COPY, THRESHOLD, K_RETRIEVE = 64, 0.6, 4


# --------------------------------------------------------------------------- data


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_data(n: int, d: int, n_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(pool [n, d], queries [n_queries, d]) float32, deterministic."""
    rng = np.random.default_rng(seed)
    centers = _normalise(rng.standard_normal((CENTERS, d), dtype=np.float32))

    def draw(m: int) -> np.ndarray:
        noise = rng.standard_normal((m, d), dtype=np.float32) * np.float32(NOISE / np.sqrt(d))
        return _normalise(centers[rng.integers(0, CENTERS, m)] + noise)

    pool = draw(n)
    copies = rng.choice(n, int(n * COPY_FRACTION), replace=False)
    originals = rng.integers(0, n, len(copies))
    noise = rng.standard_normal((len(copies), d), dtype=np.float32) * np.float32(COPY_NOISE / np.sqrt(d))
    pool[copies] = _normalise(pool[originals] + noise)
    return np.ascontiguousarray(pool, dtype=np.float32), draw(n_queries).astype(np.float32)


# --------------------------------------------------------------------------- bare FAISS


def bare_index(x: np.ndarray, spec: IndexSpec, kind: str):
    """The FAISS calls ``build_index`` makes for this spec, written out."""
    import faiss

    d = x.shape[1]
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    else:
        sample = train_rows(x, spec.train_sample, spec.seed)
        nlist = spec.nlist or default_nlist(len(x), len(sample))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = spec.seed
        index.train(sample)
        index.nprobe = spec.nprobe
    index.add(x)
    return index


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def best_of(repeats: int, ours, bare) -> tuple[float, float, object, object]:
    """Min wall time of each over ``repeats`` alternating runs, and their last results."""
    t_ours, t_bare = [], []
    for _ in range(repeats):
        t, r_ours = timed(ours)
        t_ours.append(t)
        t, r_bare = timed(bare)
        t_bare.append(t)
    return min(t_ours), min(t_bare), r_ours, r_bare


# --------------------------------------------------------------------------- benchmarks


def bench_copy(x: np.ndarray, spec: IndexSpec, repeats: int) -> dict:
    kind = spec.kind if spec.kind != "auto" else ("flat" if len(x) <= spec.flat_max else "ivf")

    def bare():
        return bare_index(x, spec, kind).search(x, K_COPY + 1)

    t_ours, t_bare, graph, (sims, ids) = best_of(repeats, lambda: copy_components(x, K_COPY, THRESHOLD, spec), bare)
    # cross-check (untimed): the bare search's edges, self dropped, as undirected unique pairs
    rows = np.repeat(np.arange(len(x)), K_COPY + 1).reshape(ids.shape)
    valid = (ids != rows) & (ids >= 0)
    keep = valid & (np.cumsum(valid, axis=1) <= K_COPY) & (sims > THRESHOLD)
    pairs = np.unique(np.minimum(rows[keep], ids[keep]) * len(x) + np.maximum(rows[keep], ids[keep]))
    ours_pairs = graph.edge_i * len(x) + graph.edge_j
    return {"task": "copy_dedup", "index": kind, "ours_s": t_ours, "bare_s": t_bare, "ratio": t_ours / t_bare,
            "edges": int(len(ours_pairs)), "components": int(graph.labels.max() + 1),
            "removed": int(len(x) - (graph.labels.max() + 1)),
            "same_edges_as_bare": bool(np.array_equal(np.sort(ours_pairs), pairs))}


def bench_retrieval(pool: np.ndarray, queries: np.ndarray, spec: IndexSpec, repeats: int) -> dict:
    kind = spec.kind if spec.kind != "auto" else ("flat" if len(pool) <= spec.flat_max else "ivf")

    def bare():
        return bare_index(pool, spec, kind).search(queries, K_RETRIEVE)

    t_ours, t_bare, hits, (_, ids) = best_of(repeats, lambda: sample_retrieval(pool, queries, K_RETRIEVE, spec), bare)
    return {"task": "retrieve (sample, k=4)", "index": kind, "ours_s": t_ours, "bare_s": t_bare,
            "ratio": t_ours / t_bare, "hits": int(len(hits)),
            "same_neighbours_as_bare": bool(np.array_equal(hits.uncurated_row, ids[ids >= 0]))}


def mean_cosine_to_centroid(x: np.ndarray, centroids: np.ndarray, labels: np.ndarray) -> float:
    c = _normalise(centroids.astype(np.float32))
    return float(np.einsum("nd,nd->n", x, c[labels]).mean())


def bench_kmeans(x: np.ndarray, k: int, niter: int, sklearn_n: int) -> dict:
    from sklearn.cluster import KMeans

    t_ours, (centroids, assign, sim) = timed(lambda: spherical_kmeans(x, k, niter=niter, seed=0, gpu=False))
    xs = x[:sklearn_n]
    km = KMeans(n_clusters=k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=0)
    t_sk, _ = timed(lambda: km.fit(xs))
    out = {"task": f"k-means (k={k}, {niter} iterations)", "ours_s": t_ours, "sklearn_s": t_sk,
           "sklearn_rows": int(len(xs)), "ours_mean_cos": float(sim.mean()),
           "sklearn_mean_cos": mean_cosine_to_centroid(xs, km.cluster_centers_, km.labels_),
           "sklearn_iterations": int(km.n_iter_)}
    # speed-up per row processed (sklearn may have run on fewer rows)
    out["speedup"] = (t_sk / len(xs)) / (t_ours / len(x))
    return out


# --------------------------------------------------------------------------- report


def machine_info() -> dict:
    import faiss
    import sklearn

    model = "?"
    with contextlib.suppress(OSError):
        model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                      if ln.startswith("model name")), "?")
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "numpy": np.__version__, "faiss": faiss.__version__, "sklearn": sklearn.__version__,
            "faiss_threads": faiss.omp_get_max_threads(), "faiss_gpus": faiss.get_num_gpus(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}


def table(results: list[dict]) -> str:
    lines = [f"{'task':<32} {'index':<6} {'ours s':>8} {'baseline s':>11} {'ratio':>7}  baseline / check",
             "-" * 100]
    for r in results:
        if "bare_s" in r:
            check = f"bare FAISS; identical results: {r.get('same_edges_as_bare', r.get('same_neighbours_as_bare'))}"
            lines.append(f"{r['task']:<32} {r['index']:<6} {r['ours_s']:>8.2f} {r['bare_s']:>11.2f} "
                         f"{r['ratio']:>6.3f}x  {check}")
        else:
            check = (f"scikit-learn KMeans on {r['sklearn_rows']:,} rows; mean cos ours {r['ours_mean_cos']:.4f} "
                     f"/ sklearn {r['sklearn_mean_cos']:.4f}")
            lines.append(f"{r['task']:<32} {'-':<6} {r['ours_s']:>8.2f} {r['sklearn_s']:>11.2f} "
                         f"{r['ours_s'] / r['sklearn_s']:>6.3f}x  {check}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark copy detection, retrieval and k-means against bare FAISS / scikit-learn.")
    p.add_argument("--n", type=int, default=200_000, help="pool rows (default 200000)")
    p.add_argument("--dim", type=int, default=256, help="dimension (default 256)")
    p.add_argument("--queries", type=int, default=10_000, help="retrieval queries (default 10000)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out", help="output folder (default benchmarks/out)")
    p.add_argument("--repeats", type=int, default=2, help="runs per timing, minimum kept (default 2)")
    p.add_argument("--copy-index", default="ivf", choices=("auto", "flat", "ivf"), help="copy_dedup index (default ivf)")
    p.add_argument("--retrieval-index", default="auto", choices=("auto", "flat", "ivf"),
                   help="retrieval index (default auto: flat at 200k)")
    p.add_argument("--omp-wait-policy", default="PASSIVE",
                   help='OMP_WAIT_POLICY for this run unless already set (default PASSIVE; "" = leave it); '
                        "pass as --omp-wait-policy=VALUE")
    p.add_argument("--kmeans-k", type=int, default=1000)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--sklearn-n", type=int, default=None, help="rows for scikit-learn's KMeans (default all)")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    pool, queries = make_data(args.n, args.dim, args.queries)
    print(f"data: {args.n:,}×{args.dim} pool, {args.queries:,} queries ({time.perf_counter() - t0:.1f}s)", flush=True)
    results = []
    results.append(bench_copy(pool, IndexSpec(kind=args.copy_index), args.repeats))
    print(f"  copy_dedup done ({time.perf_counter() - t0:.0f}s)", flush=True)
    results.append(bench_retrieval(pool, queries, IndexSpec(kind=args.retrieval_index), args.repeats))
    print(f"  retrieve done ({time.perf_counter() - t0:.0f}s)", flush=True)
    results.append(bench_kmeans(pool, args.kmeans_k, args.kmeans_iters, args.sklearn_n or args.n))
    print(f"  k-means done ({time.perf_counter() - t0:.0f}s)\n", flush=True)

    report = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": machine_info(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
              "total_s": time.perf_counter() - t0, "results": results}
    print(table(results))
    print(f"\nmachine: {report['machine']['nproc']} cores, {report['machine']['cpu_model']}; "
          f"load average before {load_before[0]:.1f}, after {report['load_average_after'][0]:.1f}; "
          f"total {report['total_s']:.0f}s")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "vectors_benchmark.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    from pipeline.plan import record_result

    print(f"wrote {record_result('vectors', plan_figures(report), report['machine'])} (read by `lvd plan`)")
    return 0


def plan_figures(report: dict) -> dict:
    """Per vector stage, the FAISS FLOP rate `lvd plan` scales with (benchmarks/results/vectors.json):
    FLOPs counted by pipeline.plan's models of the run ÷ our seconds ÷ FAISS threads."""
    from pipeline.plan import kmeans_flops, search_flops
    from pipeline.vectors.index import default_nlist, default_pq_m

    a, threads = report["args"], report["machine"]["faiss_threads"]
    n, d, spec = a["n"], a["dim"], IndexSpec()
    nlist, pq_m = default_nlist(n, min(n, spec.train_sample)), default_pq_m(d)
    out = {}
    for r in report["results"]:
        if r["task"].startswith("copy_dedup"):
            name, flops = "copy_dedup", search_flops(r["index"], n, n, d, nlist, spec.nprobe, pq_m)
        elif r["task"].startswith("retrieve"):
            name, flops = "retrieve", search_flops(r["index"], n, a["queries"], d, nlist, spec.nprobe, pq_m)
        else:
            name, flops = "cluster", kmeans_flops(n, a["kmeans_k"], d, a["kmeans_iters"])
        out[name] = {"task": r["task"], "index": r.get("index"), "n": n, "d": d, "seconds": round(r["ours_s"], 3),
                     "threads": threads, "flops": flops, "flops_per_core_s": round(flops / r["ours_s"] / threads)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
