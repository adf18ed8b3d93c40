"""The `lvd` command: parse, call the engine, print. No stage logic here."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from pipeline.config import ConfigError, Config, load_config
from pipeline.engine import Engine, StageError, StageStatus, stage_names

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
STATUS_KEYS = ("stage", "state", "fingerprint", "rows", "path", "seconds")


def _config(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def format_counts(counts: dict) -> str:
    """One count column of a stage (``{value: n}``) as ``value=n, ...``, largest first."""
    return ", ".join(f"{k}={v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def format_status_table(rows: list[StageStatus]) -> str:
    """A plain-text table of stage states (what `lvd status` prints)."""
    table = [("STAGE", "STATE", "FINGERPRINT", "ROWS", "SECONDS", "PATH")]
    for r in rows:
        table.append((r.stage, r.state, r.fingerprint[:12], "-" if r.rows is None else str(r.rows),
                      "-" if r.seconds is None else f"{r.seconds:.1f}", r.path))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:-1], widths)) + "  " + row[-1] for row in table]
    for r in rows:
        for col, counts in (r.counts or {}).items():
            lines.append(f"  {r.stage} by {col}: {format_counts(counts)}")
    return "\n".join(lines)


def config_notes(cfg: Config) -> list[str]:
    """Warnings a user must see beside the status table (e.g. random embedding weights)."""
    notes = []
    if cfg.embed.model.strip().endswith(":none"):
        notes.append(f"note: embed uses RANDOM weights ({cfg.embed.model}, pretrained: none): clusters and "
                     "retrieval are not meaningful; real runs name real weights (see `lvd models fetch`)")
    return notes


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    rows = Engine(cfg, show_progress=False).status_all()
    if args.json:
        print(json.dumps([{k: r.as_dict()[k] for k in STATUS_KEYS} | {"counts": r.counts} for r in rows], indent=2))
    else:
        print("\n".join([format_status_table(rows), *config_notes(cfg)]))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    engine = Engine(_config(args))
    results = engine.run(until=args.until)
    print(format_status_table(results))
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    engine = Engine(_config(args))
    result = engine.ensure(args.stage, force=args.force)
    print(format_status_table([engine.status(n) for n in engine.upstream_closure(args.stage)[:-1]] + [result]))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from pipeline.explain import explain, format_trail

    trail = explain(Engine(_config(args), show_progress=False), args.image)
    print(json.dumps(trail, indent=2, default=str) if args.json else format_trail(trail))
    return 0 if trail.get("ingest") else 1


def _with_section(cfg: Config, section: str, **updates: object) -> Config:
    """A copy of ``cfg`` with some fields of one section replaced (command-line overrides)."""
    values = {k: v for k, v in updates.items() if v is not None}
    if not values:
        return cfg
    return cfg.model_copy(update={section: getattr(cfg, section).model_copy(update=values)})


def _print_summary(engine: Engine, stage: str) -> None:
    summary = json.loads(engine.read_artifact(stage, "summary.json"))
    print(f"{stage}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(summary.items())))
    print(f"{stage}: exported backbone in {engine.artifact_dir(stage)} (backbone.pth, backbone_timm.pth, model.json)")


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _with_section(_config(args), "train", workers=args.workers)
    engine = Engine(cfg)
    engine.ensure("train", force=args.force)
    _print_summary(engine, "train")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    cfg = _with_section(_config(args), "distill", workers=args.workers,
                        teacher=Path(args.teacher).resolve() if args.teacher else None)
    engine = Engine(cfg)
    engine.ensure("distill", force=args.force)
    _print_summary(engine, "distill")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pipeline.stages.evaluate import evaluate_export, result_rows

    cfg = _config(args)
    cfg = _with_section(cfg, "eval", methods=[args.method],
                        train=Path(args.train).resolve() if args.train else None,
                        val=Path(args.val).resolve() if args.val else None)
    if args.backbone:  # a given backbone: evaluate it directly, outside the DAG
        if cfg.eval.train is None or cfg.eval.val is None:
            raise ValueError("give --train DIR and --val DIR (or eval.train / eval.val in the config)")
        res = evaluate_export(args.backbone, cfg.eval.train, cfg.eval.val, cfg.eval)
        rows = result_rows(str(args.backbone), str(args.backbone), res)
        if args.out:
            from model.eval.run import write_results

            write_results(args.out, res)
    else:
        engine = Engine(cfg)
        engine.ensure("eval", force=args.force)
        res = json.loads(engine.read_artifact("eval", "results.json"))
        rows = engine.read_table("eval").to_pylist()
        if "skipped" in res:
            print(f"lvd: eval skipped: {res['skipped']}", file=sys.stderr)
            return 2
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print(f"{'MODEL':<10} {'METHOD':<7} {'SETTING':<10} {'TOP1':>7} {'TOP5':>7} {'N_TRAIN':>8} {'N_VAL':>6}")
        for r in rows:
            top5 = f"{r['top5']:.4f}" if r.get("top5") is not None else "-"
            print(f"{r['model'][:10]:<10} {r['method']:<7} {r['setting'][:10]:<10} {r['top1']:>7.4f} {top5:>7} "
                  f"{r['n_train']:>8} {r['n_val']:>6}")
    return 0


def cmd_models_fetch(args: argparse.Namespace) -> int:
    from pipeline.embedding import fetch_weights, parse_spec

    path = fetch_weights(parse_spec(args.spec))
    print(f"{args.spec}: weights at {path}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _config(args)  # validate before starting anything
    from flows.serve import serve  # the one upward import: `lvd serve` is the Prefect entry point

    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "lvd")
    serve(str(Path(args.config).resolve()))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pipeline.dashboard import serve

    serve(_config(args), host=args.host, port=args.port)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.plan import run as run_plan

    return run_plan(_config(args), args)


def cmd_demo_corpus(args: argparse.Namespace) -> int:
    from pipeline.democorpus import build_demo_corpus, main_serve

    base_url = args.base_url or f"http://{args.host}:{args.port}"
    corpus = build_demo_corpus(Path(args.out), base_url=base_url)
    print(f"demo corpus in {corpus.root}: URL list {corpus.urls}, WARC {corpus.warc}, curated {corpus.curated}")
    if args.serve:
        main_serve(corpus.root, args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lvd", description="LVD-style curation and DINOv2 training as one cached DAG.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=str(DEFAULT_CONFIG), help="run YAML (default: configs/demo.yaml)")
        return sp

    sp = with_config(sub.add_parser("run", help="run every stage (or up to --until)"))
    sp.add_argument("--until", choices=stage_names(), help="stop after this stage")
    sp.set_defaults(func=cmd_run)

    sp = with_config(sub.add_parser("stage", help="run one stage (missing upstream stages first)"))
    sp.add_argument("stage", choices=stage_names())
    sp.add_argument("--force", action="store_true", help="recompute this stage even if it is done")
    sp.set_defaults(func=cmd_stage)

    sp = with_config(sub.add_parser("status", help="state of every stage"))
    sp.add_argument("--json", action="store_true", help="a JSON list of {stage,state,fingerprint,rows,path,seconds}")
    sp.set_defaults(func=cmd_status)

    sp = with_config(sub.add_parser("explain", help="one image's whole trail: fetched, filtered, clustered, retrieved"))
    sp.add_argument("image", help="an image_id or a URL")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_explain)

    models = sub.add_parser("models", help="model weights").add_subparsers(dest="models_command", required=True)
    sp = models.add_parser("fetch", help="download a spec's weights into the library's cache (on a connected machine)")
    sp.add_argument("spec", help="e.g. open_clip:ViT-H-14:laion2b_s32b_b79k")
    sp.set_defaults(func=cmd_models_fetch)

    sp = with_config(sub.add_parser("train", help="DINOv2 pretraining on the dataset (Ray Train, FSDP2); resumes"))
    sp.add_argument("--workers", type=int, help="override train.workers")
    sp.add_argument("--force", action="store_true", help="start over (discard checkpoints)")
    sp.set_defaults(func=cmd_train)

    sp = with_config(sub.add_parser("distill", help="distil the trained (or a given) teacher into a smaller student"))
    sp.add_argument("--teacher", help="an `lvd train` export folder (default: this run's train stage)")
    sp.add_argument("--workers", type=int, help="override distill.workers")
    sp.add_argument("--force", action="store_true", help="start over (discard checkpoints)")
    sp.set_defaults(func=cmd_distill)

    sp = with_config(sub.add_parser("eval", help="kNN or linear probe of the trained backbones on labelled folders"))
    sp.add_argument("method", choices=["knn", "linear"])
    sp.add_argument("--train", help="labelled ImageFolder to fit on (default eval.train)")
    sp.add_argument("--val", help="labelled ImageFolder to score on (default eval.val)")
    sp.add_argument("--backbone", help="evaluate this export folder or official DINOv2 .pth instead of the run's")
    sp.add_argument("--out", help="with --backbone: write the JSON results here")
    sp.add_argument("--json", action="store_true", help="print the full JSON results")
    sp.add_argument("--force", action="store_true")
    sp.set_defaults(func=cmd_eval)

    sp = with_config(sub.add_parser("serve", help="serve the Prefect deployments of this config"))
    sp.set_defaults(func=cmd_serve)

    sp = with_config(sub.add_parser("dashboard", help="browse a run: funnel, clusters, map, queries, removals, provenance"))
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=8777, help="port (default 8777)")
    sp.set_defaults(func=cmd_dashboard)

    from pipeline.plan import add_arguments as plan_arguments

    sp = with_config(sub.add_parser("plan", help="estimate the work per stage at a corpus size, from measured throughputs"))
    plan_arguments(sp)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("demo-corpus", help="build (and optionally serve) the demo web corpus")
    sp.add_argument("--out", default="runs/demo-corpus", help="output folder (default runs/demo-corpus)")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8765)
    sp.add_argument("--base-url", default=None, help="URL prefix written into the URL list (default http://HOST:PORT)")
    sp.add_argument("--serve", action="store_true", help="serve the site until interrupted")
    sp.set_defaults(func=cmd_demo_corpus)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return args.func(args)
    except (ConfigError, StageError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"lvd: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lvd: interrupted — rerun the same command to resume; finished shards are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
