"""python -m trol.convert SRC DST: a released TroL checkpoint → a TroL model folder."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import ConversionError, convert_released


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="trol convert", description=__doc__)
    parser.add_argument("src", help="released folder or hub id, e.g. BK-Lee/TroL-7B")
    parser.add_argument("dst", help="new folder for the converted model")
    parser.add_argument("--traversal", default="prefill", choices=["off", "prefill", "full"],
                        help="prefill = the released behaviour (default); full also traverses decode steps")
    parser.add_argument("--max-shard-size", default="2GB", help="largest output safetensors file (default 2GB)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="trol convert: %(message)s")  # e.g. the ignored config keys
    try:
        report = convert_released(args.src, args.dst, traversal=args.traversal, max_shard_size=args.max_shard_size)
    except (ConversionError, FileNotFoundError, ValueError) as exc:
        print(f"trol convert: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
