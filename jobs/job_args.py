"""Command-line pieces the jobs share: the spec with its `--set` overrides, and where Ray runs.

One place, so `python -m jobs.caption`, `python -m jobs.finetune` and the `trol` console
script describe and parse these options the same way.
"""

from __future__ import annotations

import argparse
import os
import sys

# Seconds without progress before a job logs what it is waiting for (pipelines.stall).
DEFAULT_STALL_AFTER_S = 300.0

RAY_EPILOG = (
    "Ray: a job submitted with `ray job submit` joins that cluster (RAY_ADDRESS is set for it); "
    "--address or RAY_ADDRESS joins another (`auto`: one started with `ray start` here). "
    "Otherwise the job starts a private local Ray that nothing else shares."
)


def prog(command: str) -> str:
    """Usage lines show what the user typed: `trol NAME` or `python -m jobs.NAME`."""
    return f"trol {command}" if os.path.basename(sys.argv[0]) == "trol" else f"python -m jobs.{command}"


def summary(doc: str | None) -> str:
    """A module docstring's first paragraph, on one line (the job's description)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {value}")
    return value


def spec_job_parser(command: str, doc: str | None, example: str, *, stall: bool = True) -> argparse.ArgumentParser:
    """A job's parser with SPEC, --set, --address (and --stall-after); the job adds its own."""
    parser = argparse.ArgumentParser(prog=prog(command), description=summary(doc), epilog=RAY_EPILOG)
    parser.add_argument("spec", help=f"YAML spec (see {example})")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec field, e.g. --set batch_size=16 (dotted keys reach sections)")
    add_ray_arguments(parser)
    if stall:
        add_stall_argument(parser)
    return parser


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = parser.epilog or RAY_EPILOG
    parser.add_argument("--address", default=None, metavar="ADDR",
                        help="join this Ray cluster (host:port, ray://host:port, or auto) instead of a private "
                             "local Ray; default: $RAY_ADDRESS when set")


def add_stall_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stall-after", type=positive_seconds, default=DEFAULT_STALL_AFTER_S, metavar="SECONDS",
                        help="log what the job is waiting for (each stage, Ray's pending resource demands) after "
                             "this long without progress (default %(default)g)")
