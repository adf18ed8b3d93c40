"""`eval`: kNN (k ∈ eval.ks, T = 0.07, cosine) and linear probes of the trained backbones.

For each model in ``eval.models`` (the `train` teacher and the `distill` student EMA) the frozen
backbone's features of the labelled ``eval.train`` / ``eval.val`` ImageFolders are computed once;
one output row per (model, method, setting) and every detail in ``results.json``. With no
labelled folders configured the stage still completes, with no rows and a ``results.json`` that
says what to set (so the DAG of a run without evaluation sets does not fail at its last step).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from pipeline.engine import Shard, Stage, StageContext, register
from pipeline.engine.runner import StageError
from pipeline.tables import EVAL_SCHEMA


def result_rows(model: str, checkpoint: str, res: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten ``model.eval.run.evaluate`` output into EVAL_SCHEMA rows."""
    common = {"model": model, "n_train": res["n_train"], "n_val": res["n_val"], "n_classes": res["n_classes"],
              "checkpoint": checkpoint}
    rows = []
    for k, acc in (res.get("knn", {}).get("k") or {}).items():
        rows.append({**common, "method": "knn", "setting": f"k={k}", "top1": acc["top1"], "top5": acc.get("top5")})
    if "linear" in res:
        lin = res["linear"]
        rows.append({**common, "method": "linear", "setting": f"lr={lin.get('lr')}", "top1": lin["top1"],
                     "top5": lin.get("top5")})
    return rows


def evaluate_export(export_dir: str | Path, train: Path, val: Path, section: Any) -> dict[str, Any]:
    """Load an exported backbone and run the configured probes."""
    import torch

    from model.eval.run import evaluate
    from model.export import load_backbone

    backbone = load_backbone(export_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return evaluate(backbone.to(device), train, val, methods=section.methods, ks=section.ks,
                    temperature=section.temperature, crop_size=section.crop_size, batch_size=section.batch_size,
                    device=device)


@register
class Eval(Stage):
    name = "eval"
    version = 1
    upstream = ("distill",)
    section = "eval"
    schema = EVAL_SCHEMA
    artifacts = ("results.json",)
    count_by = ("model", "method")
    description = "kNN and linear probes of the trained and distilled backbones"

    def plan(self, ctx: StageContext) -> list[Shard]:
        return [Shard(0)]

    def fingerprint_inputs(self, ctx: StageContext) -> Any:
        from pipeline.config import Source
        from pipeline.sources import source_digest  # the labelled folders' contents

        s = ctx.section
        return {p: source_digest(Source(name=f"eval-{p}", images=getattr(s, p)))
                for p in ("train", "val") if getattr(s, p) is not None}

    def compute(self, ctx: StageContext, shards: list[Shard]) -> Iterator[tuple[int, pa.Table]]:
        s = ctx.section
        results: dict[str, Any] = {}
        rows: list[dict[str, Any]] = []
        if s.train is None or s.val is None:
            results["skipped"] = ("no labelled evaluation folders: set eval.train and eval.val to ImageFolders "
                                  "(root/<class>/<image>) to get kNN and linear-probe accuracies")
            ctx.log.warning("eval: %s", results["skipped"])
        else:
            for model in s.models:
                export = ctx.engine.artifact_dir(model)
                ctx.log.info("eval: %s backbone from %s", model, export)
                try:
                    res = evaluate_export(export, s.train, s.val, s)
                except (FileNotFoundError, ValueError) as err:
                    raise StageError(f"eval of the {model} backbone: {err}") from err
                results[model] = res
                rows += result_rows(model, str(export), res)
        ctx.write_artifact("results.json", (json.dumps(results, indent=2, sort_keys=True, default=str) + "\n").encode())
        yield 0, pa.Table.from_pylist(rows, schema=EVAL_SCHEMA)
