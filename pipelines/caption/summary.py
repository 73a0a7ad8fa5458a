"""The caption run's outcome: `_SUMMARY.json`, the printed summary and the exit status."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ..specs import public_dump
from .plan import SUMMARY, CaptionPlan, now_iso

log = logging.getLogger(__name__)

# Exit statuses of `python -m jobs.caption` (documented in the README).
EXIT_COMPLETE, EXIT_PARTIAL, EXIT_BAD_SPEC, EXIT_ABORTED, EXIT_LOCKED = 0, 1, 2, 3, 4


@dataclass
class RunOutcome:
    committed: list[dict[str, Any]] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    per_actor: Counter = field(default_factory=Counter)
    first_out: float | None = None
    rows_after_first: int = 0
    aborted: BaseException | None = None
    operators: dict[str, Any] = field(default_factory=dict)  # Ray Data's per-operator figures


def summarize(plan: CaptionPlan, outcome: RunOutcome, t_start: float, t_end: float) -> dict[str, Any]:
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
        "took_over": plan.took_over, "ray_data_operators": outcome.operators, "spec": public_dump(plan.spec),
    }
    if aborted is not None:
        summary["aborted"] = f"{type(aborted).__name__}: {str(aborted).strip()[:2000]}"
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
    if summary.get("took_over"):
        lines.append(f"  {summary['took_over']}")
    lines += [f"  REDONE {uri}: {why}" for uri, why in list(summary["redone"].items())[:20]]
    if summary["orphaned_count"]:
        lines.append(f"  {summary['orphaned_count']} outputs have no input any more (left as they are), e.g. "
                     f"{summary['orphaned_outputs'][0]}")
    lines += [f"  FAILED {uri}: {why}" for uri, why in summary["failed"].items()]
    return "\n".join(lines)
