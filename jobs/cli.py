"""The `trol` console script: `trol COMMAND [ARGS...]`, one command per job plus the tools.

Each command's line in `trol --help` is the first sentence of its entry point's own module
docstring (read without importing it), so the list cannot drift from the commands.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import re
import sys

# command -> (module whose docstring describes it, module holding its main(argv))
COMMANDS = {
    "caption": ("jobs.caption", "jobs.caption"),
    "finetune": ("jobs.finetune", "jobs.finetune"),
    "evaluate": ("jobs.evaluate", "jobs.evaluate"),
    "prepare": ("jobs.prepare", "jobs.prepare"),
    "demo": ("jobs.demo", "jobs.demo"),
    "convert": ("trol.convert.__main__", "trol.convert.__main__"),
    "tiny": ("trol.tiny", "trol.tiny"),
}


def _source(module: str) -> str | None:
    """A module's file, found without importing it or its packages (trol would pull in torch)."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None or spec.origin is None:
        return None
    base = os.path.join(os.path.dirname(spec.origin), *rest)
    for path in (base + ".py", os.path.join(base, "__init__.py")):
        if os.path.isfile(path):
            return path
    return None


def describe(module: str) -> str:
    """First sentence of a module's docstring; a leading "usage: what" keeps only "what"."""
    path = _source(module)
    if path is None:
        return "(not installed)"
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    first = re.split(r"(?<=[.!?])\s", first, maxsplit=1)[0]
    command, sep, rest = first.partition(": ")
    if sep and command.startswith(("python -m", "`")):
        first = rest[:1].upper() + rest[1:]
    return first


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: trol COMMAND [ARGS...]    (trol COMMAND --help: that command's options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {describe(doc)}" for name, (doc, _) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"trol: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    run = importlib.import_module(COMMANDS[command][1]).main
    try:
        return run(rest)
    except SystemExit as exc:  # argparse exits on --help and bad arguments
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)


if __name__ == "__main__":
    sys.exit(main())
