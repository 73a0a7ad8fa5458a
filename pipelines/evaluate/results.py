"""From generated replies to the run's outputs: score every reply, compute the metrics,
write predictions.parquet, metrics.json and metrics.md (each in one PUT). No Ray here:
the job hands over the rows it collected."""

from __future__ import annotations

import json
from collections import Counter
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from ..storage import Location, Storage, parquet_bytes
from .benchmark_spec import BenchmarkSpec
from .metrics import benchmark_metrics
from .report import metrics_table
from .rows import score

PREDICTIONS, METRICS_JSON, METRICS_MD = "predictions.parquet", "metrics.json", "metrics.md"
PREDICTION_SCHEMA = pa.schema([
    ("id", pa.string()), ("benchmark", pa.string()), ("category", pa.string()), ("rotation", pa.int32()),
    ("prompt", pa.string()), ("answer", pa.string()), ("output", pa.string()), ("parsed", pa.string()),
    ("parsed_by", pa.string()), ("correct", pa.bool_()), ("error", pa.string()), ("image_key", pa.string()),
    ("num_tokens", pa.int32()),
])


def score_replies(benchmarks: list[BenchmarkSpec], replies: list[dict[str, Any]], *, reply_column: str,
                  shard_column: str, row_column: str, failed_column: str,
                  expected: dict[str, int]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Scored predictions in input order (benchmark, shard, row, rotation), and the shards
    that failed: unreadable, or with fewer rows back than `expected` (shard → rows asked;
    its order is the input order). A failed shard's rows are left out: a benchmark is
    scored on whole shards, never on a silently thinner sample."""
    failed = {r[shard_column]: r[failed_column] for r in replies if r.get(failed_column)}
    came_back: dict[str, set[int]] = {}
    for r in replies:
        came_back.setdefault(r[shard_column], set()).add(r[row_column])
    for uri, rows in expected.items():
        got = len(came_back.get(uri, ()))
        if uri not in failed and got != rows:
            failed[uri] = f"incomplete: {got} of its {rows} rows came back from generation"
    order = list(expected)
    kinds = {b.name: b.kind for b in benchmarks}
    bench_rank = {b.name: i for i, b in enumerate(benchmarks)}
    shard_rank = {uri: i for i, uri in enumerate(order)}
    kept = sorted((r for r in replies if r[shard_column] not in failed),
                  key=lambda r: (bench_rank[r["benchmark"]], shard_rank.get(r[shard_column], 0), r.get(row_column, 0),
                                 r["rotation"]))
    predictions, seen = [], Counter()
    for r in kept:
        error = r.get("problem") or r.get("error")
        output = None if error is not None else r.get(reply_column)
        scored = score(kinds[r["benchmark"]], output, {**r, "error": error})
        key = (r["benchmark"], r["id"], r["rotation"])
        seen[key] += 1
        # A repeated id would merge two questions' rotations: the repeat gets its own id.
        rid = r["id"] if seen[key] == 1 else f"{r['id']}~{seen[key]}"
        predictions.append({
            "id": rid, "benchmark": r["benchmark"], "category": r.get("category"), "rotation": r["rotation"],
            "prompt": r.get("prompt"), "answer": r.get("answer"), "output": output, "parsed": scored.parsed,
            "parsed_by": scored.how, "correct": scored.correct, "error": error, "image_key": r.get("image_key"),
            "num_tokens": r.get("num_tokens") if error is None else None,
        })
    return predictions, failed


def evaluation_metrics(benchmarks: list[BenchmarkSpec], predictions: list[dict[str, Any]], *, model: str,
                       model_identity: str, run_id: str, failed_shards: dict[str, str], seconds: float,
                       extra: dict[str, Any] | None = None) -> dict[str, Any]:
    by_bench: dict[str, list[dict[str, Any]]] = {b.name: [] for b in benchmarks}
    for p in predictions:
        by_bench[p["benchmark"]].append(p)
    out: dict[str, Any] = {
        "model": model, "model_identity": model_identity, "run_id": run_id,
        "status": "partial" if failed_shards else "complete",
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3), "rows": len(predictions),
        "errors": sum(p["error"] is not None for p in predictions),
        "failed_shards": dict(sorted(failed_shards.items())),
        "benchmarks": {},
    }
    for b in benchmarks:
        rows = by_bench[b.name]
        out["benchmarks"][b.name] = {"data": b.data, **benchmark_metrics(rows, kind=b.kind, circular=b.circular,
                                                                         mme_score=b.mme_score),
                                     "duplicate_ids": sum("~" in p["id"] for p in rows if p["rotation"] == 0)}
    out.update(extra or {})
    return out


def write_outputs(storage: Storage, output: Location, predictions: list[dict[str, Any]],
                  metrics: dict[str, Any]) -> dict[str, str]:
    """Predictions first, metrics.json last: when metrics.json is there, so is what it counts."""
    table = pa.Table.from_pylist(predictions, schema=PREDICTION_SCHEMA)
    places = {"predictions": output.join(PREDICTIONS), "metrics_md": output.join(METRICS_MD),
              "metrics": output.join(METRICS_JSON)}
    storage.write_bytes(places["predictions"], parquet_bytes(table))
    storage.write_bytes(places["metrics_md"], metrics_table(metrics).encode())
    metrics["outputs"] = {k: v.uri for k, v in places.items()}
    storage.write_bytes(places["metrics"], (json.dumps(metrics, indent=2, default=str) + "\n").encode())
    return metrics["outputs"]


def format_metrics(metrics: dict[str, Any]) -> str:
    """The console's short version: one line per benchmark."""
    lines = []
    for name, bench in metrics["benchmarks"].items():
        o = bench["overall"]
        accuracy = "—" if o["accuracy"] is None else f"{100 * o['accuracy']:.1f} %"
        line = f"  {name} ({bench['kind']}{', circular' if bench['circular'] else ''}): {accuracy} " \
               f"({o['correct']}/{o['count']}), {o['errors']} errors, {o['unparsed']} unparsed"
        if "f1" in o:
            line += f", F1 {o['f1'] if o['f1'] is None else round(o['f1'], 3)}"
        if "mme_total" in bench:
            line += f", MME {bench['mme_total']:.1f}"
        lines.append(line)
    for uri, why in metrics["failed_shards"].items():
        lines.append(f"  FAILED {uri}: {why}")
    return "\n".join(lines)
