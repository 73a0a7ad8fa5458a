"""Build fine-tuning Parquet shards from scikit-learn's digits or LLaVA-style JSON and images.

    python -m jobs.prepare digits --output DIR_OR_S3 [--shard-rows N] [--image-size 64]
                                  [--test-fraction 0.2] [--seed 0] [--resample nearest]
    python -m jobs.prepare llava --json FILE.json|.jsonl --images IMAGE_DIR
                                 --output DIR_OR_S3 [--shard-rows N]

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
from pipelines.prepare_digits import prepare_digits
from pipelines.prepare_llava import prepare_llava


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
    sub = parser.add_subparsers(dest="dataset", required=True, metavar="{digits,llava}")

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
    return parser


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
        if args.dataset == "digits":
            summary = prepare_digits(
                args.output,
                shard_rows=args.shard_rows,
                image_size=args.image_size,
                test_fraction=args.test_fraction,
                seed=args.seed,
                resample=args.resample,
                overwrite=args.overwrite,
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
