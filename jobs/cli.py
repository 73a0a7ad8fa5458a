"""The `trol` console script: `trol caption|finetune|evaluate|prepare|tiny|demo ...`, one per job."""

from __future__ import annotations

import sys

USAGE = """usage: trol COMMAND [ARGS...]

commands:
  caption SPEC.yaml [--set k=v ...]   caption Parquet shards with a TroL model (Ray)
  finetune SPEC.yaml [--set k=v ...]  fine-tune a TroL model (Ray Train)
  evaluate SPEC.yaml [--compare M.json] score a TroL model on benchmark sets (Ray)
  prepare digits|llava|eval-* ...     build fine-tuning or benchmark Parquet shards
  convert SRC DST [--traversal ...]    a released TroL checkpoint (BK-Lee/TroL-7B, ...) → a TroL folder
  tiny OUT_DIR [--backbone ...]       write a tiny random TroL model (tests, demos)
  demo                                the `make demo` run
"""


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "caption":
        from jobs.caption import main as run
    elif command == "finetune":
        from jobs.finetune import main as run
    elif command == "evaluate":
        from jobs.evaluate import main as run
    elif command == "prepare":
        from jobs.prepare import main as run
    elif command == "convert":
        from trol.convert.__main__ import main as run
    elif command == "tiny":
        from trol.tiny import main as run
    elif command == "demo":
        from jobs.demo import main as demo

        return demo()
    else:
        print(f"trol: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return run(rest)


if __name__ == "__main__":
    sys.exit(main())
