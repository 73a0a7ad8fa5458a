"""Batch captioning: plan → read → preprocess → predict → commit, on Ray.

- `caption_plan`: which shards exist and which are verifiably done (no Ray, no model).
- `caption_run`: the scheduler: streaming readers, predictor actors, bounded open shards.
- here: committing one shard, the job summary, and `run_caption` tying them together.

Exactly-once per shard: a shard's output is written in one PUT when all its rows are in,
then its stats JSON, which is the commit marker (and what a rerun verifies). A crash
leaves committed shards as they are and the rest without a marker; a rerun redoes those,
overwriting any half-written object. The output object is never visible incomplete.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .assembly import ROW, AssemblyError, replace_rows
from .caption_plan import RUN, STATS_DIR, SUMMARY, CaptionPlan, Shard, now_iso, plan_caption  # noqa: F401
from .lease import LeaseKeeper
from .specs import CaptionSpec, public_dump
from .storage import parquet_bytes, with_retries

log = logging.getLogger(__name__)

# Exit statuses of `python -m jobs.caption` (documented in the README).
EXIT_COMPLETE, EXIT_PARTIAL, EXIT_BAD_SPEC, EXIT_ABORTED, EXIT_LOCKED = 0, 1, 2, 3, 4


def commit_shard(plan: CaptionPlan, shard: Shard, table: pa.Table | None) -> dict[str, Any]:
    """Write one shard's output (one PUT), then its stats JSON, which marks it done.
    `table` holds the captioned rows sorted by `__row` (all rows, or with retry_errors the
    rows redone, merged here into the committed output)."""
    attempts = plan.spec.transient_retries + 1
    if table is None:
        table = pa.table({ROW: pa.array([], pa.int64())})
    table = table.append_column("model", pa.array([plan.spec.model] * table.num_rows, type=pa.string()))
    if shard.wanted is not None:
        data = with_retries(lambda: plan.storage.read_bytes(shard.out), attempts=attempts, what=shard.out.uri)
        committed = pq.read_table(io.BytesIO(data))
        out = replace_rows(committed, table.select([*committed.column_names, ROW]))
    else:
        if table.num_rows and not np.array_equal(table.column(ROW).to_numpy(), np.arange(shard.rows)):
            raise AssemblyError(f"{shard.uri}: rows do not match its {shard.rows}-row footer; not committed")
        out = table.select(shard.schema.names).cast(shard.schema) if table.num_rows else shard.schema.empty_table()
    body = parquet_bytes(out)
    with_retries(lambda: plan.storage.write_bytes(shard.out, body), attempts=attempts, what=shard.out.uri)
    stats = {
        "input": shard.uri, "output": shard.out.uri, "rows": out.num_rows,
        "input_size": shard.identity.size, "input_version": shard.identity.version,
        "errors": out.num_rows - pc.count(out.column("error"), mode="only_null").as_py(),
        "num_tokens": int(pc.sum(out.column("num_tokens")).as_py() or 0),
        "rows_captioned": len(shard.wanted) if shard.wanted is not None else out.num_rows,
        "model": plan.spec.model, "model_identity": plan.model.identity, "fingerprint": plan.fingerprint,
        "run_id": plan.run_id, "committed_at": now_iso(),
    }
    with_retries(lambda: plan.storage.write_json(shard.stats, stats), attempts=attempts, what=shard.stats.uri)
    return stats


def execute_caption(plan: CaptionPlan) -> dict[str, Any]:
    """Run the shards still to do; write and return the job summary. If the run itself
    dies (say, the model cannot load), shards committed so far stay committed, the summary
    records the abort, and the error is raised again."""
    from .caption_run import CaptionRunner, RunOutcome

    t_start = time.time()
    with LeaseKeeper(plan.storage, plan.output, plan.run_id, plan.spec.lease_seconds):
        outcome = RunOutcome()
        for shard in (s for s in plan.todo if s.rows == 0):  # nothing to caption: commit at once
            try:
                outcome.committed.append(commit_shard(plan, shard, None))
            except Exception as exc:  # noqa: BLE001
                outcome.failed[shard.uri] = f"commit failed: {exc}"
        work = [s for s in plan.todo if s.rows > 0]
        if work:
            ran = CaptionRunner(plan, commit_shard).run(work)
            ran.committed += outcome.committed
            ran.failed.update(outcome.failed)
            outcome = ran
        summary = summarize(plan, outcome, t_start, time.time())
    if outcome.aborted is not None:
        raise outcome.aborted
    return summary


def summarize(plan: CaptionPlan, outcome: Any, t_start: float, t_end: float) -> dict[str, Any]:
    committed, failed = outcome.committed, {**plan.unusable, **outcome.failed}
    rows_out = sum(c["rows_captioned"] for c in committed)
    tokens = sum(c["num_tokens"] for c in committed)
    seconds = max(t_end - t_start, 1e-9)
    first_out = outcome.first_out
    steady = (t_end - first_out) if first_out and t_end > first_out else None
    aborted = outcome.aborted
    status = "aborted" if aborted is not None else ("partial" if failed else "complete")
    summary = {
        "run_id": plan.run_id, "output": plan.output.uri, "finished_at": now_iso(), "status": status,
        "shards_total": len(plan.shards) + len(plan.unusable), "shards_skipped": len(plan.shards) - len(plan.todo),
        "shards_committed": len(committed), "shards_failed": len(failed),
        "failed": {k: v for k, v in sorted(failed.items())[:100]},
        "redone": {s.uri: s.why for s in plan.todo if s.why not in ("new",)},
        "orphaned_outputs": plan.orphans[:100], "orphaned_count": len(plan.orphans),
        "rows_in": sum(len(s.wanted) if s.wanted is not None else s.rows for s in plan.todo), "rows_out": rows_out,
        "rows_skipped": sum(s.rows for s in plan.shards if s.why == "done"),
        "errors": sum(c["errors"] for c in committed), "num_tokens": tokens,
        "wall_seconds": round(time.time() - plan.started, 3), "pipeline_seconds": round(seconds, 3),
        "startup_seconds": round(first_out - t_start, 3) if first_out else None,
        "images_per_s": round(rows_out / seconds, 3), "tokens_per_s": round(tokens / seconds, 3),
        "steady_images_per_s": round(outcome.rows_after_first / steady, 3) if steady else None,
        "rows_per_actor": dict(outcome.per_actor), "driver_peak_rss_mib": peak_rss_mib(),
        "spec": public_dump(plan.spec),
    }
    if aborted is not None:
        summary["aborted"] = f"{type(aborted).__name__}: {str(aborted).strip().splitlines()[-1][:500]}"
    try:
        plan.storage.write_json(plan.output.join(SUMMARY), summary)
    except Exception as exc:  # noqa: BLE001 - the shards are committed; the summary is a report
        log.error("could not write the summary: %s", exc)
    return summary


def peak_rss_mib() -> float | None:
    """This process's peak resident memory (Linux VmHWM, which starts afresh at exec, so a
    driver started from a big parent reports only its own)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def exit_status(summary: dict[str, Any]) -> int:
    return {"complete": EXIT_COMPLETE, "partial": EXIT_PARTIAL}.get(summary.get("status"), EXIT_ABORTED)


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"caption run {summary['run_id']} → {summary['output']}: {summary['status']}",
        f"  shards: {summary['shards_committed']} committed, {summary['shards_skipped']} already done, "
        f"{summary['shards_failed']} failed (of {summary['shards_total']})",
        f"  rows: {summary['rows_out']} written of {summary['rows_in']}, {summary['errors']} with errors",
    ]
    if summary["rows_out"]:
        lines.append(
            f"  speed: {summary['images_per_s']} images/s, {summary['tokens_per_s']} tokens/s over "
            f"{summary['pipeline_seconds']} s (startup {summary['startup_seconds']} s, then "
            f"{summary['steady_images_per_s']} images/s)"
        )
    lines.append(f"  wall: {summary['wall_seconds']} s; summary in {summary['output']}/{SUMMARY}")
    lines += [f"  REDONE {uri}: {why}" for uri, why in list(summary["redone"].items())[:20]]
    if summary["orphaned_count"]:
        lines.append(f"  {summary['orphaned_count']} outputs have no input any more (left as they are), e.g. "
                     f"{summary['orphaned_outputs'][0]}")
    lines += [f"  FAILED {uri}: {why}" for uri, why in summary["failed"].items()]
    return "\n".join(lines)


def run_caption(spec: CaptionSpec, *, force: bool = False) -> dict[str, Any]:
    """Plan (fails fast on a bad spec), then caption what is not done yet."""
    return execute_caption(plan_caption(spec, force=force))
