"""Build Parquet shards for fine-tuning (scikit-learn's digits, LLaVA-style JSON) and for benchmarks.

    python -m jobs.prepare digits --output DIR_OR_S3 [--shard-rows N] [--image-size 64]
                                  [--test-fraction 0.2] [--seed 0] [--resample nearest] [--choice-rows]
    python -m jobs.prepare llava --json FILE.json|.jsonl --images IMAGE_DIR
                                 --output DIR_OR_S3 [--shard-rows N]

Benchmark sets for `python -m jobs.evaluate` (shards with image bytes):

    python -m jobs.prepare eval-mmbench --tsv FILE.tsv --output DIR_OR_S3
    python -m jobs.prepare eval-yes-no --json FILE.json|.jsonl --images IMAGE_DIR --output DIR_OR_S3 [--category C]
    python -m jobs.prepare eval-llava --json FILE.json|.jsonl --images IMAGE_DIR --output DIR_OR_S3 [--category C]
    python -m jobs.prepare eval-digits --output DIR_OR_S3 [--image-size 64] [--test-fraction 0.2] [--seed 0]

Exit status: 0 on success, 2 for bad arguments or input that yields no rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from jobs.job_args import summary
from pipelines.prepare import (
    DEFAULT_DIGITS_SHARD_ROWS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_LLAVA_SHARD_ROWS,
    DEFAULT_TEST_FRACTION,
    PrepareError,
)
from pipelines.prepare.digits import prepare_digits
from pipelines.prepare.benchmarks import prepare_digits_choice, prepare_llava_questions, prepare_mmbench, prepare_yes_no
from pipelines.prepare.llava import prepare_llava

EVAL_COMMANDS = ("eval-mmbench", "eval-yes-no", "eval-llava", "eval-digits")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _prog() -> str:
    # The same parser serves `python -m jobs.prepare` and the `trol prepare` console script;
    # usage lines should show the command the user actually typed.
    return "trol prepare" if os.path.basename(sys.argv[0]) == "trol" else "python -m jobs.prepare"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=_prog(), description=summary(__doc__))
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{digits,llava," + ",".join(EVAL_COMMANDS) + "}")

    digits = sub.add_parser("digits", help="scikit-learn's bundled digits -> train/ and test/ shards")
    digits.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    digits.add_argument(
        "--shard-rows", type=_positive_int, default=DEFAULT_DIGITS_SHARD_ROWS, help="rows per shard (default %(default)s)"
    )
    digits.add_argument(
        "--image-size", type=_positive_int, default=DEFAULT_IMAGE_SIZE, help="square side in pixels (default %(default)s)"
    )
    digits.add_argument(
        "--test-fraction", type=float, default=DEFAULT_TEST_FRACTION, help="held-out share (default %(default)s)"
    )
    digits.add_argument("--seed", type=int, default=0, help="split seed (default %(default)s)")
    digits.add_argument(
        "--resample", choices=("nearest", "bilinear"), default="nearest", help="upscaling filter (default %(default)s)"
    )
    digits.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    digits.add_argument("--choice-rows", action="store_true",
                        help="also ask each training image as eval-digits' 10-way multiple choice (letter answers)")

    llava = sub.add_parser("llava", help="LLaVA-style JSON/JSONL + image folder -> shards")
    llava.add_argument("--json", required=True, dest="json_path", metavar="FILE", help="records: a JSON array or JSON lines")
    llava.add_argument("--images", required=True, metavar="DIR", help="folder the records' 'image' paths are relative to")
    llava.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
    llava.add_argument(
        "--shard-rows", type=_positive_int, default=DEFAULT_LLAVA_SHARD_ROWS, help="rows per shard (default %(default)s)"
    )
    llava.add_argument(
        "--workers", type=_positive_int, default=None, help="threads reading and checking images (default: CPUs, at most 8)"
    )
    llava.add_argument("--overwrite", action="store_true", help="replace shards already in --output")
    _add_eval_commands(sub)
    return parser


def _add_eval_commands(sub: argparse._SubParsersAction) -> None:
    def common(p: argparse.ArgumentParser, shard_rows: int = DEFAULT_LLAVA_SHARD_ROWS) -> None:
        p.add_argument("--output", required=True, help="local folder or s3://bucket/prefix")
        p.add_argument("--shard-rows", type=_positive_int, default=shard_rows, help="rows per shard (default %(default)s)")
        p.add_argument("--overwrite", action="store_true", help="replace shards already in --output")

    mmbench = sub.add_parser("eval-mmbench", help="benchmark: MMBench-style TSV (base64 images, options A-F) -> shards")
    mmbench.add_argument("--tsv", required=True, metavar="FILE", help="index, question, hint, A..F, answer, category, image")
    common(mmbench)
    for name, what in (("eval-yes-no", "yes/no questions, POPE/MME style"), ("eval-llava", "LLaVA-style questions")):
        p = sub.add_parser(name, help=f"benchmark: {what} (JSON array or JSON lines) + image folder -> shards")
        p.add_argument("--json", required=True, dest="json_path", metavar="FILE", help="records: a JSON array or JSON lines")
        p.add_argument("--images", required=True, metavar="DIR", help="folder the records' 'image' paths are relative to")
        p.add_argument("--category", default=None, help="category of records that name none (e.g. POPE's adversarial)")
        p.add_argument("--workers", type=_positive_int, default=None, help="threads reading images (default: CPUs, max 8)")
        common(p)
    digits = sub.add_parser("eval-digits", help="benchmark: the held-out digits as 10-way multiple choice -> shards")
    digits.add_argument("--image-size", type=_positive_int, default=DEFAULT_IMAGE_SIZE,
                        help="square side in pixels; match the training shards (default %(default)s)")
    digits.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION,
                        help="held-out share, as given to `prepare digits` (default %(default)s)")
    digits.add_argument("--seed", type=int, default=0, help="split seed, as given to `prepare digits` (default %(default)s)")
    digits.add_argument("--resample", choices=("nearest", "bilinear"), default="nearest", help="upscaling filter")
    common(digits, shard_rows=512)


def _run_eval_command(args: argparse.Namespace):
    if args.dataset == "eval-mmbench":
        return prepare_mmbench(args.tsv, args.output, shard_rows=args.shard_rows, overwrite=args.overwrite)
    if args.dataset == "eval-digits":
        return prepare_digits_choice(args.output, image_size=args.image_size, test_fraction=args.test_fraction,
                                     seed=args.seed, resample=args.resample, shard_rows=args.shard_rows,
                                     overwrite=args.overwrite)
    prepare = prepare_yes_no if args.dataset == "eval-yes-no" else prepare_llava_questions
    return prepare(args.json_path, args.images, args.output, shard_rows=args.shard_rows, overwrite=args.overwrite,
                   workers=args.workers, category=args.category)


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv[1:]), write the shards, print a summary; return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits on --help and on bad arguments
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    if not logging.getLogger().handlers:
        # Our progress lines at INFO; other libraries (boto3, ...) only when they warn.
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
        logging.getLogger("pipelines").setLevel(logging.INFO)
    try:
        if args.dataset in EVAL_COMMANDS:
            summary = _run_eval_command(args)
        elif args.dataset == "digits":
            summary = prepare_digits(
                args.output,
                shard_rows=args.shard_rows,
                image_size=args.image_size,
                test_fraction=args.test_fraction,
                seed=args.seed,
                resample=args.resample,
                overwrite=args.overwrite,
                choice_rows=args.choice_rows,
            )
        else:
            summary = prepare_llava(
                args.json_path,
                args.images,
                args.output,
                shard_rows=args.shard_rows,
                overwrite=args.overwrite,
                workers=args.workers,
            )
    except PrepareError as exc:
        print(f"{parser.prog} {args.dataset}: error: {exc}", file=sys.stderr)
        return 2
    print(summary.format())
    print(f"prepare: done; outputs in {summary.output}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
