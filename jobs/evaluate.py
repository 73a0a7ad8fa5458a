"""Score a TroL model on benchmark sets on Ray.

    python -m jobs.evaluate SPEC.yaml [--set key=value ...] [--compare OTHER/metrics.json]
    python -m jobs.evaluate --compare THIS/metrics.json OTHER/metrics.json
    ray job submit --working-dir . -- python -m jobs.evaluate SPEC.yaml

Writes predictions.parquet, metrics.json and metrics.md to the spec's output. With
--compare, prints this run (or the first file) beside the other one, with deltas.
Exit status: 0 every benchmark shard scored; 1 partial: some shards could not be read
(named in metrics.json; the metrics cover the rest); 2 bad spec or arguments (nothing
ran); 3 aborted: the run itself failed (e.g. the model cannot load).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

EXIT_COMPLETE, EXIT_PARTIAL, EXIT_BAD_SPEC, EXIT_ABORTED = 0, 1, 2, 3


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from jobs.job_args import add_ray_arguments, prog, summary

    parser = argparse.ArgumentParser(prog=prog("evaluate"), description=summary(__doc__))
    parser.add_argument("spec", nargs="?", help="YAML evaluate spec (see jobs/examples/evaluate_digits.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set model=./other --set benchmarks.0.limit=50")
    parser.add_argument("--compare", nargs="+", default=None, metavar="METRICS_JSON",
                        help="with a spec: OTHER/metrics.json to print beside this run; without one: "
                             "THIS/metrics.json OTHER/metrics.json (local or s3://)")
    add_ray_arguments(parser)
    args = parser.parse_args(argv)
    if args.spec is None and (not args.compare or len(args.compare) != 2):
        parser.error("give a SPEC.yaml, or --compare THIS/metrics.json OTHER/metrics.json")
    if args.spec is not None and args.compare and len(args.compare) != 1:
        parser.error("with a spec, --compare takes one OTHER/metrics.json")
    return args


def _read_metrics(uri: str) -> dict[str, Any]:
    from pipelines.storage import Storage, StorageError, parse_uri

    try:
        loc = parse_uri(uri)
        storage = Storage.from_environment() if loc.scheme == "s3" else Storage()
        data = storage.read_json(loc)
    except (StorageError, ValueError) as exc:
        raise SystemExit(f"evaluate: --compare {uri!r}: {exc}") from None
    if not isinstance(data, dict) or "benchmarks" not in data:
        raise SystemExit(f"evaluate: --compare {uri!r} is not an evaluation's metrics.json")
    return data


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:
        return EXIT_BAD_SPEC if exc.code else 0  # argparse exits 0 for --help, 2 for bad arguments
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from pipelines.evaluate.report import compare_table

    if args.spec is None:
        try:
            this, other = (_read_metrics(u) for u in args.compare)
        except SystemExit as exc:
            print(exc, file=sys.stderr)
            return EXIT_BAD_SPEC
        print(compare_table(this, other), flush=True)
        return EXIT_COMPLETE

    from jobs.ray_session import ensure_ray
    from pipelines.evaluate.job import plan_evaluation, run_planned
    from pipelines.evaluate.results import format_metrics
    from pipelines.evaluate.spec import EvaluateSpec
    from pipelines.specs import SpecError, load_spec

    try:
        spec = load_spec(EvaluateSpec, args.spec, args.overrides)
        plan = plan_evaluation(spec)
        other = _read_metrics(args.compare[0]) if args.compare else None
    except SpecError as exc:
        print(f"evaluate: spec error: {exc}", file=sys.stderr)
        return EXIT_BAD_SPEC
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_SPEC
    print(f"evaluate: {len(spec.benchmarks)} benchmark(s), {len(plan.tasks)} shards, "
          f"{sum(t.rows for t in plan.tasks)} rows, {len(plan.unusable)} unusable → {plan.output.uri}", flush=True)
    print(f"evaluate: running on {ensure_ray(args.address).describe()}", flush=True)
    try:
        metrics = run_planned(plan, spec)
    except Exception as exc:  # noqa: BLE001 - say it plainly and exit 3
        print(f"evaluate: aborted: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:500]}", file=sys.stderr)
        return EXIT_ABORTED
    print(f"evaluate {spec.model}: {metrics['status']} in {metrics['seconds']:.0f} s", flush=True)
    print(format_metrics(metrics), flush=True)
    if other is not None:
        print("\n" + compare_table(metrics, other), flush=True)
    print(f"evaluate: outputs in {plan.output.uri} (predictions.parquet, metrics.json, metrics.md)", flush=True)
    return EXIT_COMPLETE if metrics["status"] == "complete" else EXIT_PARTIAL


if __name__ == "__main__":
    sys.exit(main())
