"""Caption Parquet shards with a TroL model on Ray Data.

    python -m jobs.caption SPEC.yaml [--set key=value ...] [--plan-only]
    ray job submit --working-dir . -- python -m jobs.caption SPEC.yaml

Exit status: 0 all shards done, 1 some shards failed (rerun to retry them), 2 bad spec.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jobs.ray_session import ensure_ray
from jobs.specs import CaptionSpec, SpecError, load_spec

log = logging.getLogger("jobs.caption")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.caption", description=__doc__.split("\n\n")[0])
    parser.add_argument("spec", help="YAML caption spec (see jobs/examples/caption_local.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set batch_size=16 --set generation.max_new_tokens=20")
    parser.add_argument("--plan-only", action="store_true", help="check the spec and list the work; caption nothing")
    parser.add_argument("--progress-every", type=_seconds, default=30.0, metavar="SECONDS",
                        help="seconds between progress lines (shards done, rows/s); default %(default)s")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from jobs.caption_progress import CaptionProgress
    from pipelines.caption import execute_caption, format_summary, plan_caption

    try:
        spec = load_spec(CaptionSpec, args.spec, args.overrides)
        plan = plan_caption(spec, claim=not args.plan_only)
    except SpecError as exc:
        print(f"caption: spec error: {exc}", file=sys.stderr)
        return 2
    todo_rows = sum(s.rows for s in plan.todo)
    print(f"caption: {len(plan.shards)} shards, {len(plan.shards) - len(plan.todo)} already done, "
          f"{len(plan.todo)} to do ({todo_rows} rows) → {plan.output.uri}", flush=True)
    if args.plan_only:
        for shard in plan.todo:
            print(f"  {shard.uri} ({shard.rows} rows) → {shard.out.uri}")
        return 0
    if todo_rows:
        ensure_ray()
    with CaptionProgress(plan, interval_s=args.progress_every):
        summary = execute_caption(plan)
    print(format_summary(summary), flush=True)
    failed = summary["shards_failed"]
    print(f"caption: {'done' if not failed else f'{failed} shards failed (rerun to retry them)'}; "
          f"outputs in {plan.output.uri}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
