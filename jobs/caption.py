"""Caption Parquet shards with a TroL model on Ray.

    python -m jobs.caption SPEC.yaml [--set key=value ...] [--plan-only] [--force]
    ray job submit --working-dir . -- python -m jobs.caption SPEC.yaml

Exit status: 0 every shard done; 1 partial: some shards failed (see the summary), the rest
are committed, rerun to retry the failed ones; 2 bad spec (nothing ran); 3 aborted: the run
itself failed (e.g. the model cannot load, or nothing moved for stall_timeout_s), committed
shards stay; 4 another live run holds the output (its lease), nothing ran. A run whose
holder is provably dead (its process gone on this host, or its Ray job ended on this
cluster) is taken over without --force, and the job says so.

Progress: a line per --progress-every seconds counted from committed shards, and Ray Data's
per-stage progress (rows through each stage) in the same log.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.job_args import positive_seconds, spec_job_parser
from jobs.ray_session import ensure_ray
from pipelines.specs import CaptionSpec, SpecError, load_spec

log = logging.getLogger("jobs.caption")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = spec_job_parser("caption", __doc__, "jobs/examples/caption_local.yaml", stall=False)
    parser.add_argument("--plan-only", action="store_true", help="check the spec and list the work; caption nothing")
    parser.add_argument("--progress-every", type=positive_seconds, default=30.0, metavar="SECONDS",
                        help="seconds between progress lines (shards done, rows/s); default %(default)s")
    parser.add_argument("--force", action="store_true",
                        help="take the output even if another run's lease on it has not expired (that run is dead)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Ray Data logs each stage's progress every this many seconds when there is no terminal
    # (read when ray.data is first imported, which happens below).
    os.environ.setdefault("RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL", str(max(1, round(args.progress_every))))
    from jobs.caption_progress import CaptionProgress
    from pipelines.caption import (EXIT_ABORTED, EXIT_BAD_SPEC, EXIT_COMPLETE, EXIT_LOCKED, OutputLockedError,
                                   execute_caption, exit_status, format_summary, plan_caption)
    from pipelines.caption.lease import read_lease

    try:
        spec = load_spec(CaptionSpec, args.spec, args.overrides)
        try:
            plan = plan_caption(spec, claim=not args.plan_only, force=args.force)
        except OutputLockedError:
            # The holder may be a Ray job that has ended: only this cluster can tell.
            held = read_lease(*_output_of(spec))
            if not (held and held.get("ray_job")):
                raise
            ensure_ray()
            plan = plan_caption(spec, claim=not args.plan_only, force=args.force)
    except OutputLockedError as exc:
        print(f"caption: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except SpecError as exc:
        print(f"caption: spec error: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    if plan.took_over:
        print(f"caption: {plan.took_over}", flush=True)
    todo_rows = sum(s.rows if s.wanted is None else len(s.wanted) for s in plan.todo)
    print(f"caption: {len(plan.shards)} shards, {len(plan.shards) - len(plan.todo)} already done, "
          f"{len(plan.todo)} to do ({todo_rows} rows), {len(plan.unusable)} unusable → {plan.output.uri}", flush=True)
    if args.plan_only:
        for shard in plan.todo:
            print(f"  {shard.uri} ({shard.rows} rows, {shard.why}) → {shard.out.uri}")
        for uri, why in plan.unusable.items():
            print(f"  UNUSABLE {uri}: {why}")
        return 0
    if todo_rows:
        print(f"caption: running on {ensure_ray(args.address).describe()}", flush=True)
        # Ray Data's per-stage progress goes to the job's log whatever level Ray's own
        # loggers were quieted to.
        logging.getLogger("ray.data._internal.progress.logging_progress").setLevel(logging.INFO)
    try:
        with CaptionProgress(plan, interval_s=args.progress_every):
            summary = execute_caption(plan)
    except Exception as exc:  # noqa: BLE001 - the summary already records it; say it plainly and exit 3
        print(f"caption: aborted: {type(exc).__name__}: {str(exc).strip()[:2000]}", file=sys.stderr)
        return EXIT_ABORTED
    print(format_summary(summary), flush=True)
    status = exit_status(summary)
    failed = summary["shards_failed"]
    print(f"caption: {'done' if status == EXIT_COMPLETE else f'partial, {failed} shards failed (rerun to retry them)'}; "
          f"outputs in {plan.output.uri}", flush=True)
    return status


def _output_of(spec: CaptionSpec):
    """(storage, output location) of a spec, for reading its lease."""
    from pipelines.storage import Storage, parse_uri

    return Storage.from_environment(spec.storage.endpoint_url, spec.storage.region), parse_uri(spec.output.rstrip("/"))


if __name__ == "__main__":
    sys.exit(main())
